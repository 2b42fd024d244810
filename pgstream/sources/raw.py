"""Undecoded input: the payloads of one read, handed to the runtime's fused kernels.

A source whose records are JSON values (a file's lines, a Kafka/NATS/Redis message's value)
can give the runtime its payloads undecoded instead of :class:`SourceRecord` objects; the
runtime then decodes them in the same loop that evaluates them (see
:mod:`pgstream.runtime.kernels`). Offsets are computed only where needed: a file's are the
byte positions of its lines (derived from the line lengths), a message source's are listed.
A table's rows come as the tuples the database driver returns (:class:`TableRows`): the
kernels build a dict per row only when a Python function needs one.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import orjson

from pgstream.gcpause import gc_paused
from pgstream.sources.base import SourceRecord

__all__ = ["JsonPayloads", "RawBatch", "RawReader", "TableRows", "json_type_name"]

_JSON_TYPE_NAMES: dict[type, str] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def json_type_name(value: Any) -> str:
    """``an array``, ``a string``, ... for a decoded JSON value that is not an object."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


class RawBatch(abc.ABC):
    """The payloads of one read, not decoded yet, covering the offsets ``[start, end)``.

    Payload ``i`` is the record at :meth:`offset` ``(i)``; offsets increase. ``head`` is the
    source's newest offset when the read knew it.
    """

    __slots__ = ()

    #: how the kernels find each payload's offset without asking: the payloads lie back to
    #: back in a byte stream, ``gap`` separator bytes apart (a file's lines: 1), so offsets
    #: follow from their lengths; ``None`` when the offsets are listed (:meth:`offsets`)
    gap: ClassVar[int | None] = None

    start: int
    end: int
    head: int | None

    @property
    @abc.abstractmethod
    def payloads(self) -> Sequence[Any]:
        """The undecoded values (JSON bytes; a table's row tuples), in offset order."""

    @abc.abstractmethod
    def offset(self, index: int) -> int:
        """The offset of payload ``index``."""

    @abc.abstractmethod
    def offsets(self) -> Iterable[int]:
        """Every payload's offset, in order (computed as it is iterated, where possible)."""

    @abc.abstractmethod
    def decode(self, index: int) -> SourceRecord | None:
        """Payload ``index`` as a record: an error record (``value=None``) when it is not one
        JSON object, ``None`` when it is no record at all (a file's blank line)."""

    @abc.abstractmethod
    def extend(self, more: RawBatch) -> None:
        """Append the read that continued where this one ended."""

    def __len__(self) -> int:
        return len(self.payloads)

    def records(self) -> list[SourceRecord]:
        """Decode every payload (payloads that are no record are left out)."""
        with gc_paused():
            decoded = [self.decode(i) for i in range(len(self.payloads))]
        return [r for r in decoded if r is not None]


@runtime_checkable
class RawReader(Protocol):
    """A partition reader that can hand over its records undecoded (see :class:`RawBatch`)."""

    def read_raw(self, start: int, max_records: int) -> RawBatch:
        """Like ``read``: up to ``max_records`` payloads from offset ``start``."""
        ...


@dataclass(slots=True)
class JsonPayloads(RawBatch):
    """Message values with their listed offsets (a Kafka, NATS or Redis read)."""

    values: list[bytes]
    offset_list: list[int]
    start: int
    end: int
    head: int | None = None

    @property
    def payloads(self) -> list[bytes]:
        """The message values."""
        return self.values

    def offset(self, index: int) -> int:
        """The listed offset of message ``index``."""
        return self.offset_list[index]

    def offsets(self) -> Iterable[int]:
        """The listed offsets."""
        return self.offset_list

    def decode(self, index: int) -> SourceRecord:
        """Message ``index`` decoded; an error record if it is not one JSON object."""
        pos, payload = self.offset_list[index], self.values[index]
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            error = f"message at offset {pos} is not valid JSON: {exc}"
            return SourceRecord(pos, None, raw=payload, error=error)
        if type(value) is dict:
            return SourceRecord(pos, value)
        error = f"message at offset {pos} is {json_type_name(value)}, not a JSON object"
        return SourceRecord(pos, None, raw=payload, error=error)

    def extend(self, more: RawBatch) -> None:
        """Append the messages of the read that continued where this one ended."""
        if more.start != self.end:
            raise ValueError(
                f"payloads at {more.start} do not continue payloads ending at {self.end}"
            )
        self.values.extend(more.payloads)
        self.offset_list.extend(more.offsets())
        self.end, self.head = more.end, more.head


@dataclass(slots=True)
class TableRows(RawBatch):
    """Rows of a table as tuples, in offset order: record ``i`` is
    ``dict(zip(names, rows[i]))`` and its offset is ``rows[i][offset_index]``.

    ``names`` may be shorter than a row: the offset column, when read only for the offsets,
    comes last and is no field of the record (``zip`` stops at the shorter).
    """

    names: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    offset_index: int
    start: int
    end: int
    head: int | None = None

    @property
    def payloads(self) -> list[tuple[Any, ...]]:
        """The row tuples."""
        return self.rows

    def offset(self, index: int) -> int:
        """The offset column of row ``index``."""
        return int(self.rows[index][self.offset_index])

    def offsets(self) -> Iterable[int]:
        """Every row's offset column."""
        i = self.offset_index
        return (row[i] for row in self.rows)

    def decode(self, index: int) -> SourceRecord:
        """Row ``index`` as a record (a row always is one)."""
        row = self.rows[index]
        return SourceRecord(row[self.offset_index], dict(zip(self.names, row)))

    def records(self) -> list[SourceRecord]:
        """Every row as a record."""
        names, i = self.names, self.offset_index
        with gc_paused():
            return [SourceRecord(row[i], dict(zip(names, row))) for row in self.rows]

    def extend(self, more: RawBatch) -> None:
        """Append the rows of the read that continued where this one ended."""
        if more.start != self.end or not isinstance(more, TableRows):
            raise ValueError(f"rows at {more.start} do not continue rows ending at {self.end}")
        if not self.rows:  # nothing read yet: the next read's layout
            self.names, self.offset_index = more.names, more.offset_index
        elif more.rows and (more.names, more.offset_index) != (self.names, self.offset_index):
            raise ValueError(f"rows at {more.start} have other columns than the rows before")
        self.rows.extend(more.rows)
        self.end, self.head = more.end, more.head

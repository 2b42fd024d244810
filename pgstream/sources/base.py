"""The contract every source implements.

A source is a set of partitions; each partition is an ordered, replayable sequence of records
addressed by integer offsets. A reader returns records starting at an offset together with the
exclusive end offset of what it returned, so the next read starts exactly where this one ended.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import psycopg

Record = dict[str, Any]


@dataclass(slots=True)
class SourceRecord:
    """One input record at ``offset``.

    ``value`` is the decoded record (a dict) or ``None`` when decoding failed, in which case
    ``error`` says why and ``raw`` keeps the undecodable bytes for the dead-letter table.
    """

    offset: int
    value: Record | None
    raw: bytes | None = None
    error: str | None = None


@dataclass(slots=True)
class ReadResult:
    """Records read from one partition and the exclusive end offset they cover.

    ``end`` may be greater than the last record's offset + 1 (a file's trailing newline, blank
    lines); ``end == start`` means nothing new is safely readable yet.
    """

    records: list[SourceRecord]
    end: int
    head: int | None = field(default=None)  # the source's newest offset, when cheap to know


@dataclass(frozen=True, slots=True)
class OpenContext:
    """What the job offers a source that opens a reader.

    A source takes what it needs and ignores the rest: a table source connects to the job's
    database (``dsn``); a file or a broker source needs none of it.
    """

    dsn: str  # the job's database, for sources that read from it
    #: the record fields the pipeline reads, when it can tell (no Python function sees the
    #: records); ``None``: any field may be read. A table source then selects only these.
    fields: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class TableRead:
    """A PostgreSQL table a source reads, and the column its offsets come from."""

    schema: str | None
    relname: str
    offset_column: str

    def regclass_text(self) -> str:
        """The table name quoted for ``::regclass`` (no connection needed)."""
        ident = '"' + self.relname.replace('"', '""') + '"'
        if self.schema is None:
            return ident
        return '"' + self.schema.replace('"', '""') + '".' + ident


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def epoch_ms(when: datetime) -> int:
    """``when`` (timezone-aware) in epoch milliseconds, rounded up: a record stamped with a
    whole millisecond is at or after ``when`` exactly when its stamp is >= this."""
    micros = (when - _EPOCH) // timedelta(microseconds=1)
    return -(-micros // 1000)


class SourceError(Exception):
    """A source cannot continue (missing table, truncated file, offsets jumped)."""


class SourceUnreachable(SourceError):
    """The source's server cannot be reached now (down, restarting, network cut): the
    runtime retries with back-off, reopening the reader, and stops only after
    ``Settings.max_retries`` failures in a row."""


#: what a broker source does when records after the committed offset are gone: stop
#: (``"error"``), continue at the oldest record still held (``"earliest"``) or at the end
#: (``"latest"``); a skipped range is recorded in ``pgstream.skipped_ranges``
OnLost = Literal["error", "earliest", "latest"]
ON_LOST: tuple[OnLost, ...] = ("error", "earliest", "latest")


def check_on_lost(owner: str, on_lost: str) -> OnLost:
    """``on_lost`` if it is a policy, else a ConfigError naming ``owner`` and the choices."""
    from pgstream.errors import ConfigError

    for policy in ON_LOST:
        if on_lost == policy:
            return policy
    raise ConfigError(
        f"{owner}: on_lost must be 'error', 'earliest' or 'latest', not {on_lost!r}"
    )


@dataclass(frozen=True, slots=True)
class Skip:
    """Offsets ``[start, end)`` of a partition that a reset policy passed over unread:
    ``reason`` is ``"retention"`` (expired, trimmed, purged), ``"deleted"`` (single records
    removed); ``detail`` says what the source held instead; ``policy`` is the source's
    ``on_lost``."""

    start: int
    end: int
    reason: str
    detail: str
    policy: str


class SkipLog:
    """The skips a reader made, kept until the batch covering them commits (the runtime
    reads them with :meth:`PartitionReader.skips`). Thread-safe: the read-ahead thread reads
    too. A skip found again (a re-read) is kept once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._skips: dict[int, Skip] = {}

    def add(self, skip: Skip) -> None:
        """Remember ``skip`` (one per start offset)."""
        with self._lock:
            self._skips.setdefault(skip.start, skip)

    def within(self, start: int, end: int) -> list[Skip]:
        """The skips starting in ``[start, end)``, in offset order."""
        with self._lock:
            return sorted(
                (s for s in self._skips.values() if start <= s.start < end),
                key=lambda s: s.start,
            )

    def forget(self, below: int) -> None:
        """Drop the skips starting below ``below`` (their batch committed)."""
        with self._lock:
            self._skips = {k: s for k, s in self._skips.items() if k >= below}


class PartitionReader(abc.ABC):
    """Reads one partition. Owned by exactly one worker while it holds the lease."""

    @abc.abstractmethod
    def read(self, start: int, max_records: int) -> ReadResult:
        """Return up to ``max_records`` records at offsets >= ``start`` that are safe to commit."""

    def head(self) -> int | None:
        """The exclusive end offset of everything the source holds now (for lag), if known."""
        return None

    def retained_from(self) -> int | None:
        """The first offset the source still holds, for sources that drop old records
        (broker retention, trimming); None when it keeps everything. ``verify`` cannot
        re-read below it."""
        return None

    def instance(self) -> str | None:
        """Which instance of the stream this reader reads (a Kafka topic id, a NATS stream's
        creation time), if the source has such a thing: a different one than the committed
        offsets belong to means the stream was recreated."""
        return None

    def skips(self, start: int, end: int) -> list[Skip]:
        """Ranges starting in ``[start, end)`` that a reset policy skipped (see :class:`Skip`);
        the batch that covers them records them in its transaction."""
        return []

    def forget_skips(self, below: int) -> None:  # noqa: B027 - optional hook
        """The batch ending at ``below`` committed: drop its skips."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""


class Source(abc.ABC):
    """A replayable, offset-addressed input."""

    #: short kind name shown in status output ("table", "file", ...)
    kind: str = "source"

    @abc.abstractmethod
    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """The partition names currently present."""

    @abc.abstractmethod
    def initial_offset(self, partition: str) -> int:
        """The offset a partition starts at when nothing has been committed yet."""

    @abc.abstractmethod
    def open(self, partition: str, context: OpenContext) -> PartitionReader:
        """Open a reader for ``partition``; ``context`` offers what the job has (its
        database, for table sources)."""

    def validate(self, conn: psycopg.Connection[Any]) -> None:  # noqa: B027 - optional hook
        """Raise :class:`SourceError` with a clear message if the source cannot be read."""

    def offset_at(self, partition: str, when: datetime, context: OpenContext) -> int | None:
        """The offset of ``partition``'s first record stamped at or after ``when`` (the
        partition's end offset when no record is), for sources whose records carry a time
        (``pgstream rewind --to-time``); None when the source cannot tell. ``when`` is
        timezone-aware. Raises :class:`SourceError` when the source cannot be asked."""
        return None

    def describe(self) -> str:
        """A one-line human description."""
        return self.kind

    def single_partition(self) -> bool:
        """Whether this source always has exactly one partition (a fold over it sees every
        record of a key in one place). Sources that may have several say False."""
        return True

    def partition_key(self) -> str | None:
        """The record field whose value decides a record's partition, when the source
        guarantees that all records with one value land in one partition (None: no such
        guarantee). A fold keyed on it is correct across partitions."""
        return None

    def tables_read(self) -> Sequence[TableRead]:
        """The PostgreSQL tables this source reads (the runtime role needs SELECT on them)."""
        return ()

    def identity(self) -> str:
        """What the offsets of this source mean: the same string for the same data.

        Stamped into ``partitions.source_identity`` when a stream's partitions are registered;
        a stream whose stored identity differs is refused at start instead of resumed
        (offsets of one table or file mean nothing in another). Sources override this with
        what they read (a table and its offset column, a resolved file path, a topic); the
        default is the one-line description.
        """
        return f"{self.kind} {self.describe()}"

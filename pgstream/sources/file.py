"""JSON Lines files as a source: one file (one partition), or many (a glob or a directory,
one partition per file, new files picked up while the job runs).

The offset of a record is the byte position where its line starts, so a committed offset is
always the byte right after a newline and a restarted job resumes exactly at the next line.
A partial last line (no newline yet) is left alone until it is complete, which makes a file that
another process appends to a live stream.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, count
from operator import add
from typing import Any, ClassVar

import orjson
import psycopg

from pgstream.gcpause import gc_paused
from pgstream.sources.base import (
    OpenContext,
    PartitionReader,
    ReadResult,
    Source,
    SourceError,
    SourceRecord,
)
from pgstream.sources.raw import RawBatch, json_type_name

__all__ = ["FileReader", "FileSource", "JsonLines", "decode_line"]

_MIN_BLOCK = 64 * 1024
_MAX_BLOCK = 4 * 1024 * 1024
_NEWLINE = 0x0A
_BOM = b"\xef\xbb\xbf"

class FileSource(Source):
    """Records from JSON Lines files: one JSON object per line.

    ``FileSource("orders.jsonl")`` reads one file as one partition named ``"0"``.
    ``FileSource("landing/*.jsonl")`` (a glob; ``**`` recurses) or ``FileSource("landing")``
    (a directory: every file directly in it) read one partition per file, named by the file's
    path relative to the pattern's base directory (``"2024/a.jsonl"``), so names are stable
    across restarts; files that appear while the job runs are picked up. Names starting with
    ``.`` are ignored (write a file under a hidden name and rename it in, or append to it).

    The offset is the byte position of a line's start. Lines that are blank produce no record;
    lines that are not a JSON object (malformed JSON, invalid UTF-8, an array, ...) produce a
    record with ``value=None`` and an ``error`` so that they reach the dead-letter table.
    A file may only grow: if it becomes shorter than a committed offset, or a file with
    committed offsets disappears, the reader raises :class:`SourceError` instead of silently
    re-reading or skipping data.
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.path: str = os.fspath(path)
        self.abspath: str = os.path.abspath(self.path)
        self.name: str = name if name is not None else self.path
        #: many files: (base directory, pattern relative to it); None for a single file
        self.many: tuple[str, str] | None = _split_pattern(self.abspath)

    def single_partition(self) -> bool:
        """One file is one partition; a glob or a directory has one per file."""
        return self.many is None

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """``"0"`` for a single file; else the matching files, relative to the base."""
        if self.many is None:
            return ["0"]
        base, pattern = self.many
        if not os.path.isdir(base):
            raise SourceError(
                f"file source {self.path!r}: its directory {base} does not exist or is not a "
                "directory; fix: create it or correct the pattern given to FileSource"
            )
        found = []
        for path in glob.glob(os.path.join(glob.escape(base), pattern), recursive=True):
            if os.path.isfile(path):
                found.append(os.path.relpath(path, base))
        return sorted(found)

    def initial_offset(self, partition: str) -> int:
        """Start at the first byte of the file."""
        return 0

    def open(self, partition: str, context: OpenContext) -> FileReader:
        """Open the partition's file for reading (``context`` is unused)."""
        if self.many is None:
            if partition != "0":
                raise SourceError(f"{self.describe()} has only partition '0', not {partition!r}")
            return FileReader(self.abspath, display=self.path)
        base = self.many[0]
        if os.path.isabs(partition) or ".." in partition.split(os.sep):
            raise SourceError(f"{self.describe()}: {partition!r} is not a file under {base}")
        return FileReader(os.path.join(base, partition), display=partition)

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Raise :class:`SourceError` if the file (or the files' directory) is missing or
        cannot be read."""
        if self.many is None:
            _check_readable(self.abspath, self.path)
        else:
            self.partitions(conn)

    def identity(self) -> str:
        """``file <absolute path, symlinks resolved>``; ``files <resolved base>/<pattern>``
        for many files."""
        if self.many is None:
            return f"file {os.path.realpath(self.abspath)}"
        base, pattern = self.many
        return f"files {os.path.join(os.path.realpath(base), pattern)}"

    def describe(self) -> str:
        """``file <path>``."""
        return f"file {self.name}"

    def __repr__(self) -> str:
        return f"FileSource({self.path!r})"


def _split_pattern(abspath: str) -> tuple[str, str] | None:
    """(base directory, pattern under it) for a glob or a directory; None for one file."""
    if os.path.isdir(abspath):
        return abspath, "[!.]*"
    if not glob.has_magic(abspath):
        return None
    parts = abspath.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:first]) or os.sep
    return base, os.sep.join(parts[first:])


def _check_readable(abspath: str, display: str) -> None:
    if not os.path.exists(abspath):
        raise SourceError(
            f"file source {display!r} does not exist (looked for {abspath}); "
            "fix: create the file or correct the path given to FileSource"
        )
    if not os.path.isfile(abspath):
        raise SourceError(f"file source {display!r} is not a regular file ({abspath})")
    if not os.access(abspath, os.R_OK):
        raise SourceError(f"file source {display!r} is not readable by this process ({abspath})")


class FileReader(PartitionReader):
    """Reads complete lines of one JSON Lines file from a byte offset."""

    def __init__(self, abspath: str, *, display: str | None = None) -> None:
        self.abspath = abspath
        self.display = display if display is not None else abspath
        self._fd: int | None = None
        self._ident: tuple[int, int] = (0, 0)
        self._avg_line = 256.0  # running estimate of bytes per line, sizes the next block
        self._open()

    # -- file handling -------------------------------------------------------------------

    def _open(self) -> None:
        try:
            fd = os.open(self.abspath, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise SourceError(
                f"file source {self.display!r} does not exist (looked for {self.abspath}); "
                "fix: create the file or correct the path given to FileSource"
            ) from None
        except OSError as exc:
            raise SourceError(f"cannot open file source {self.display!r}: {exc}") from exc
        st = os.fstat(fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._ident = (st.st_dev, st.st_ino)

    def _current_fd(self) -> int:
        """The open descriptor, reopened if the path now names a different file."""
        try:
            st = os.stat(self.abspath)
        except FileNotFoundError:
            raise SourceError(
                f"file source {self.display!r} no longer exists ({self.abspath}); it was deleted "
                "or renamed while the job was reading it. fix: restore the file (its offsets are "
                "byte positions, so it must keep its content) or reset the job's offsets"
            ) from None
        if self._fd is None or (st.st_dev, st.st_ino) != self._ident:
            self._open()
        assert self._fd is not None
        return self._fd

    def head(self) -> int | None:
        """The current size of the file in bytes."""
        if self._fd is None:
            return None
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading ---------------------------------------------------------------------------

    def read(self, start: int, max_records: int) -> ReadResult:
        """Decode complete lines from byte ``start``; ``end`` is right after the last one used."""
        batch = self.read_raw(start, max_records)
        return ReadResult(batch.records(), batch.end, batch.head)

    def read_raw(self, start: int, max_records: int) -> JsonLines:
        """Like :meth:`read`, but hand the complete lines over undecoded (a
        :class:`~pgstream.sources.raw.RawBatch`).

        The runtime decodes them in the same loop that evaluates them, which saves building a
        :class:`SourceRecord` per line on the fast path.
        """
        fd = self._current_fd()
        size = os.fstat(fd).st_size
        if start > size:
            raise SourceError(
                f"offsets jumped in {self.describe()}: the committed offset {start} is past the "
                f"end of the file of size {size} (the file was truncated or replaced by a shorter "
                "one). fix: restore the original file, or reset this job's offset for the source "
                "if the new file is meant to be read from the start"
            )
        if start > 0 and os.pread(fd, 1, start - 1) != b"\n":
            raise SourceError(
                f"offsets jumped in {self.describe()}: the committed offset {start} is not at "
                "the start of a line (the file was rewritten or replaced). fix: restore the "
                "original file, or reset this job's offset for the source"
            )
        if max_records <= 0 or start == size:
            return JsonLines([], start, start, size)

        want = int(self._avg_line * max_records * 1.25) + 1024
        want = min(max(want, _MIN_BLOCK), _MAX_BLOCK, size - start)
        buf = os.pread(fd, want, start)
        if buf.rfind(b"\n") < 0:
            buf = self._read_long_line(fd, start, buf)
            if not buf:
                return JsonLines([], start, start, size)  # only a partial line so far

        lines = buf.split(b"\n")
        tail = lines.pop()  # the (possibly empty) piece after the last newline: not complete yet
        if len(lines) > max_records:
            del lines[max_records:]
            end = start + sum(map(len, lines)) + len(lines)
        else:
            end = start + len(buf) - len(tail)
        if end > start:
            self._avg_line = (end - start) / len(lines)
        return JsonLines(lines, start, end, max(size, end))

    def _read_long_line(self, fd: int, start: int, first: bytes) -> bytes:
        """Extend ``first`` (which holds no newline) up to and including the next newline.

        Returns ``b""`` if the file ends before a newline (the line is still being written).
        """
        chunks = [first]
        pos = start + len(first)
        step = max(len(first), _MIN_BLOCK)
        while True:
            step = min(step * 2, 64 * 1024 * 1024)
            chunk = os.pread(fd, step, pos)
            if not chunk:
                return b""
            i = chunk.find(b"\n")
            if i >= 0:
                chunks.append(chunk[: i + 1])
                return b"".join(chunks)
            chunks.append(chunk)
            pos += len(chunk)

    def describe(self) -> str:
        """``file <path>``."""
        return f"file {self.display}"


@dataclass(slots=True)
class JsonLines(RawBatch):
    """Complete lines of a JSON Lines file, not decoded yet.

    ``lines`` (newline stripped) cover the bytes ``[start, end)`` exactly: line ``i`` starts
    at ``start + sum(len(lines[j]) + 1 for j < i)``. Blank lines are no records.
    """

    gap: ClassVar[int | None] = 1  # the newline between lines

    lines: list[bytes]
    start: int
    end: int
    head: int | None = None
    _offsets: list[int] | None = field(default=None, repr=False)

    @property
    def payloads(self) -> list[bytes]:
        """The lines."""
        return self.lines

    def offset(self, index: int) -> int:
        """The byte offset where line ``index`` starts."""
        if self._offsets is None:
            self._offsets = list(accumulate((len(x) + 1 for x in self.lines), initial=self.start))
        return self._offsets[index]

    def offsets(self) -> Iterable[int]:
        """Every line's byte offset, computed from the line lengths as it is iterated."""
        return map(add, accumulate(map(len, self.lines), initial=self.start), count())

    def decode(self, index: int) -> SourceRecord | None:
        """Line ``index`` decoded (see :func:`decode_line`)."""
        return decode_line(self.offset(index), self.lines[index])

    def extend(self, more: RawBatch) -> None:
        """Append the lines of the read that continued where this one ended."""
        if more.start != self.end:
            raise ValueError(f"lines at {more.start} do not continue lines ending at {self.end}")
        self.lines.extend(more.payloads)
        self.end, self.head, self._offsets = more.end, more.head, None

    def records(self) -> list[SourceRecord]:
        """Decode every line (blank lines produce no record)."""
        return _decode_lines(self.lines, self.start)[0]


def decode_line(pos: int, line: bytes) -> SourceRecord | None:
    """The record of one newline-stripped line at byte ``pos``: ``None`` for a blank line, an
    error record (``value=None``) for a line that is not one JSON object."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return _bad_line(pos, line, exc) if line.strip() else None
    if type(value) is dict:
        return SourceRecord(pos, value)
    return _not_an_object(pos, line, value)


def _decode_lines(lines: list[bytes], start: int) -> tuple[list[SourceRecord], int]:
    """Decode newline-stripped ``lines`` whose first byte is at ``start``.

    Returns the records and the offset right after the last line's newline. This is the hot
    loop: it does nothing per line beyond ``orjson.loads``, a type check and the record itself,
    with the cyclic garbage collector paused (:func:`~pgstream.gcpause.gc_paused`).
    """
    records: list[SourceRecord] = []
    append = records.append
    loads = orjson.loads
    record = SourceRecord
    pos = start
    with gc_paused():
        for line in lines:
            try:
                value = loads(line)
            except orjson.JSONDecodeError as exc:
                if line.strip():
                    append(_bad_line(pos, line, exc))
                # else: a blank line, covered by ``end`` but producing no record
            else:
                if type(value) is dict:
                    append(record(pos, value))
                else:
                    append(_not_an_object(pos, line, value))
            pos += len(line) + 1
    return records, pos


def _bad_line(pos: int, line: bytes, exc: orjson.JSONDecodeError) -> SourceRecord:
    """The error record for a line that is not valid JSON (or not UTF-8)."""
    if pos == 0 and line.startswith(_BOM):
        try:
            value = orjson.loads(line[len(_BOM) :])
        except orjson.JSONDecodeError as exc2:
            exc = exc2
        else:
            if type(value) is dict:
                return SourceRecord(pos, value)
            return _not_an_object(pos, line, value)
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as uexc:
        bad = line[uexc.start : uexc.start + 1]
        error = (
            f"line at byte offset {pos} is not valid UTF-8: byte 0x{bad.hex()} at position "
            f"{uexc.start} of the line ({uexc.reason})"
        )
    else:
        error = f"line at byte offset {pos} is not valid JSON: {exc}"
    return SourceRecord(pos, None, raw=line, error=error)


def _not_an_object(pos: int, line: bytes, value: Any) -> SourceRecord:
    """The error record for valid JSON that is not an object."""
    kind = json_type_name(value)
    return SourceRecord(
        pos,
        None,
        raw=line,
        error=f"line at byte offset {pos} is {kind}, not a JSON object "
        "(each line of a JSON Lines source must be one object)",
    )

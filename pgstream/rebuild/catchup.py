"""The catch-up of a shadow job: the ordinary worker, its reads bounded by the live job.

Every partition of the shadow job reads only below the live job's committed offset of the
same partition (:class:`BoundedReader`), so the shadow never gets ahead of the live job and
the swap can always finish what is left. Rounds repeat, re-reading the live offsets, while
the gap shrinks. The shadow's batches are ordinary checkpoints: a rebuild killed at any point
resumes from them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from pgstream.db import queries
from pgstream.errors import JobStateError
from pgstream.rebuild.shadow import Shadow
from pgstream.runtime.crashpoints import crash_point
from pgstream.runtime.task import PartitionTask
from pgstream.runtime.worker import Worker
from pgstream.sources.base import PartitionReader, ReadResult, Skip
from pgstream.sources.table import TableReader

#: most catch-up rounds before the swap finishes the rest in its transaction
MAX_ROUNDS = 8

Key = tuple[str, str]


class BoundedReader(PartitionReader):
    """A partition's reader that returns nothing at or beyond ``bound``: a read that reaches
    it ends exactly there, and the head is at most ``bound``."""

    def __init__(self, inner: PartitionReader, bound: int) -> None:
        self.inner = inner
        self.bound = bound

    def read(self, start: int, max_records: int) -> ReadResult:
        """Up to ``max_records`` records in ``[start, bound)``. A table is read as it is,
        without waiting for its safe horizon: the range below a committed offset is final."""
        if start >= self.bound:
            return ReadResult([], start, self.bound)
        if isinstance(self.inner, TableReader):
            records = self.inner.read_range(start, self.bound, max_records)
            full = len(records) >= max_records > 0
            end = records[-1].offset + 1 if full else self.bound
            return ReadResult(records, end, self.bound)
        res = self.inner.read(start, max_records)
        head = self.bound if res.head is None else min(res.head, self.bound)
        if res.end <= self.bound:
            return ReadResult(res.records, res.end, head)
        return ReadResult([r for r in res.records if r.offset < self.bound], self.bound, head)

    def head(self) -> int | None:
        """The inner head, at most ``bound``."""
        inner = self.inner.head()
        return self.bound if inner is None else min(inner, self.bound)

    def retained_from(self) -> int | None:
        """As the inner reader."""
        return self.inner.retained_from()

    def instance(self) -> str | None:
        """As the inner reader."""
        return self.inner.instance()

    def skips(self, start: int, end: int) -> list[Skip]:
        """As the inner reader, below ``bound``."""
        return [s for s in self.inner.skips(start, end) if s.start < self.bound]

    def forget_skips(self, below: int) -> None:
        """As the inner reader."""
        self.inner.forget_skips(below)

    def close(self) -> None:
        """Close the inner reader."""
        self.inner.close()


@dataclass(frozen=True, slots=True)
class CatchUpProgress:
    """Records the shadow job has done and has to do in all (the live job's count), summed
    over the rebuilt partitions."""

    done: int
    total: int
    round: int


ProgressFn = Callable[[CatchUpProgress], None]


def offsets(conn: psycopg.Connection[Any], job: str, streams: tuple[str, ...]) -> dict[Key, int]:
    """Each partition's committed offset of ``job`` (partitions with none left out)."""
    return {k: o for k, (o, _n) in _rows(conn, job, streams).items()}


def _rows(
    conn: psycopg.Connection[Any], job: str, streams: tuple[str, ...]
) -> dict[Key, tuple[int, int]]:
    """Each partition's (committed offset, records) of ``job`` (partitions with no offset
    left out)."""
    params = {"job": job, "streams": list(streams)}
    return {
        (s, p): (int(o), int(n))
        for s, p, o, n in conn.execute(queries.REBUILD_OFFSETS, params)
        if o is not None
    }


class CatchUp:
    """Runs the shadow job until it is close behind the live job (see the module docstring)."""

    def __init__(
        self,
        shadow: Shadow,
        conn: psycopg.Connection[Any],
        dsn: str,
        *,
        progress: ProgressFn | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.shadow = shadow
        self.conn = conn
        self.dsn = dsn
        self.progress = progress
        self.stop_event = stop_event or threading.Event()
        self._bounds: dict[Key, int] = {}
        self._done = self._total = 0
        self._round = 0

    def gap(self) -> tuple[int, int]:
        """(records the shadow is behind the live job, records the live job has done), summed
        over the rebuilt partitions; a partition at the live offset is not behind."""
        streams = self.shadow.selection.streams
        live = _rows(self.conn, self.shadow.selection.app.name, streams)
        mine = _rows(self.conn, self.shadow.job, streams)
        behind = total = 0
        for key, (offset, records) in live.items():
            at, done = mine.get(key, (None, 0))
            total += records
            if at != offset:
                behind += max(1, records - done)
        return behind, total

    def run(self) -> int:
        """Catch-up rounds while the gap shrinks (at most :data:`MAX_ROUNDS`); return the
        rounds run. Interrupted (``stop_event``), it raises: nothing is swapped."""
        behind, total = self.gap()
        self._report(total - behind, total)
        last: int | None = None
        while self._round < MAX_ROUNDS and (last is None or 0 < behind < last):
            self._round += 1
            last = behind
            self._run_round(total - behind, total)
            if self.stop_event.is_set():
                raise JobStateError(
                    "the rebuild was interrupted during its catch-up: nothing was swapped",
                    hint="run the same rebuild again: it resumes from the shadow job's checkpoints",
                )
            behind, total = self.gap()
            self._report(total - behind, total)
        return self._round

    def _run_round(self, done: int, total: int) -> None:
        """One worker run of the shadow job, bounded by the live offsets read now."""
        self._bounds = offsets(
            self.conn, self.shadow.selection.app.name, self.shadow.selection.streams
        )
        self._done, self._total = done, total
        Worker(
            self.shadow.app,
            self.dsn,
            stop_when_idle=True,
            stop_event=self.stop_event,
            install_signal_handlers=False,
            on_commit=self._committed,
            wrap_reader=self._bounded,
            target="rebuild",
        ).run()

    def _bounded(self, stream: str, partition: str, reader: PartitionReader) -> PartitionReader:
        first = self.shadow.app.sources[stream].initial_offset(partition)
        return BoundedReader(reader, self._bounds.get((stream, partition), first))

    def _committed(self, task: PartitionTask, records: int) -> None:
        crash_point("rebuild_after_batch")
        self._done += records
        self._report(min(self._done, self._total), self._total)

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(CatchUpProgress(done, total, self._round))

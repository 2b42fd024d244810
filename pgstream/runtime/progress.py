"""What ``pgstream run`` prints while it runs: a start line and a periodic progress line.

Both go to the ``pgstream.progress`` logger, which ``run`` shows by default (stderr), so the
lines carry the same timestamp and worker label as every other log line::

    ... pgstream.progress: job "shop": 2 streams, 3 partitions; database "test" at ...
    ... pgstream.progress: job "shop": 12,345 records (2,469/s), 14 batches, 0 dead letters,
        lag 0 on 3 partitions

The lag is in the sources' offset units, as in ``pgstream status`` (ids for a table, bytes for a
file), summed over the partitions this worker holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pgstream.runtime.observers import WorkerObserver

__all__ = ["Progress", "ProgressReporter", "total_lag"]

log = logging.getLogger("pgstream.progress")


@dataclass(frozen=True, slots=True)
class Progress:
    """A worker's totals at one moment."""

    records: int
    batches: int
    dead_letters: int
    lag: int | None  # None when no owned partition knows its source head yet
    partitions: int  # partitions this worker holds


class ProgressReporter(WorkerObserver):
    """Logs the start line once and a progress line every ``interval`` seconds (0: never).

    As a worker's observer it logs the start line when the worker has started and a progress
    line after a pass over the partitions when one is due.
    """

    def __init__(self, interval: float, database: str, workers: str = "1 worker") -> None:
        self.interval = interval
        self._job = ""
        self.database = database
        self.workers = workers
        self._last_at = time.monotonic()
        self._last_records = 0
        self._last: Progress | None = None

    def started(self, job: str, streams: int, partitions: int) -> None:
        """The start line: job, streams and partitions, database (no password), workers."""
        log.info(
            'job "%s": %s, %s; %s; %s',
            job,
            _count(streams, "stream"),
            _count(partitions, "partition"),
            self.database,
            self.workers,
        )
        self._job = job
        self._last_at = time.monotonic()

    def polled(self, progress: Callable[[], Progress]) -> None:
        """Log a progress line if one is due (the totals are computed only then)."""
        if self.due():
            self.report(self._job, progress())

    def due(self) -> bool:
        """Whether a progress line is due now."""
        return self.interval > 0 and time.monotonic() - self._last_at >= self.interval

    def report(self, job: str, progress: Progress) -> None:
        """Log one progress line (records/s since the last line); skipped while the worker
        is idle and caught up with nothing new since the last line."""
        now = time.monotonic()
        rate = (progress.records - self._last_records) / max(now - self._last_at, 1e-9)
        idle = progress.lag == 0 and self._last == progress
        self._last_at, self._last_records, self._last = now, progress.records, progress
        if idle:
            return
        lag = "lag unknown" if progress.lag is None else f"lag {progress.lag:,}"
        log.info(
            'job "%s": %s records (%s/s), %s, %s, %s on %s',
            job,
            f"{progress.records:,}",
            f"{rate:,.0f}",
            _count(progress.batches, "batch", "batches"),
            _count(progress.dead_letters, "dead letter"),
            lag,
            _count(progress.partitions, "partition"),
        )


def total_lag(pairs: Iterable[tuple[int | None, int]]) -> int | None:
    """Sum of ``head - position`` over (head, position) pairs whose head is known."""
    known = [max(0, head - position) for head, position in pairs if head is not None]
    return sum(known) if known else None


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"

"""Event time: when a record happened, and how far each partition's event time has come.

An :class:`EventClock` reads a record's event time (a field or a function; a datetime, an
ISO-8601 string or Unix epoch seconds). A :class:`Watermarks` tracks, per partition, the
largest event time seen so far. Window assigners (:mod:`pgstream.operators.windows`) say which
windows an event time falls into; they do not read records or track time themselves.

Today nothing consumes the watermark: window rows are upserted in place, so a late record
simply updates its window (unbounded allowed lateness). Late records and final-window emission
build on this module.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

__all__ = ["EventClock", "Watermarks", "event_time"]

#: where a record's event time is: a field name or a function of the record
TimeSpec = str | Callable[[Any], Any]


def event_time(value: Any) -> datetime:
    """A record's timestamp: a datetime, an ISO-8601 string or Unix epoch seconds."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc)
    raise TypeError(f"event time must be a datetime, ISO string or epoch seconds, got {value!r}")


class EventClock:
    """Reads records' event times from ``time`` (a field name or a function)."""

    def __init__(self, time: TimeSpec) -> None:
        self.time = time
        #: a record's raw time value (what :func:`event_time` reads)
        self.get: Callable[[Any], Any] = (
            operator.itemgetter(time) if isinstance(time, str) else time
        )

    def epoch_of(self, record: Any) -> float:
        """``record``'s event time in Unix epoch seconds."""
        return event_time(self.get(record)).timestamp()

    def watermarks(self) -> Watermarks:
        """A fresh per-partition watermark tracker for this clock's event times."""
        return Watermarks()


class Watermarks:
    """The largest event time (epoch seconds) seen so far, per partition.

    Advanced record by record in offset order; it never moves back. The job's watermark is
    the smallest over its partitions (a partition that saw nothing yet holds it back).
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def advance(self, partition: str, epoch: float) -> float:
        """Note an event time read from ``partition``; return its watermark."""
        current = self._seen.get(partition)
        if current is None or epoch > current:
            self._seen[partition] = current = epoch
        return current

    def of(self, partition: str) -> float | None:
        """``partition``'s watermark, or None before its first event."""
        return self._seen.get(partition)

    def overall(self, partitions: list[str]) -> float | None:
        """The smallest watermark over ``partitions``, None while one of them has none."""
        marks = [self._seen.get(p) for p in partitions]
        if not marks or any(m is None for m in marks):
            return None
        return min(m for m in marks if m is not None)

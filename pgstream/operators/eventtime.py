"""Event time: when a record happened, and how far each partition's event time has come.

An :class:`EventClock` reads a record's event time (a field or a function; a datetime, an
ISO-8601 string or Unix epoch seconds, or milliseconds with ``time_unit="ms"``). A
:class:`Watermarks` tracks, per partition, the largest event time seen so far. Window
assigners (:mod:`pgstream.operators.windows`) say which windows an event time falls into and
own the lateness and finality rules; they do not read records or track time themselves.

A missing or unparsable time raises :class:`EventTimeError` (the record becomes a dead letter
whose error names the field and the accepted forms).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

__all__ = ["EventClock", "EventTimeError", "TimeUnit", "Watermarks", "event_time"]

#: where a record's event time is: a field name or a function of the record
TimeSpec = str | Callable[[Any], Any]
#: how a number is read as an event time: epoch seconds or epoch milliseconds
TimeUnit = Literal["s", "ms"]

#: the epoch seconds of years 1 and 9999 (a datetime's range)
_MIN_EPOCH, _MAX_EPOCH = -62135596800, 253402300799
_FORMS = "a datetime, an ISO-8601 string or Unix epoch seconds"


class EventTimeError(TypeError, ValueError):
    """A record's event time is missing or cannot be read (a ``TypeError`` for a value of no
    time type, a ``ValueError`` for an unparsable one: both, so either may be caught)."""


def event_time(value: Any, unit: TimeUnit = "s") -> datetime:
    """A record's timestamp: a datetime, an ISO-8601 string or Unix epoch seconds (epoch
    milliseconds with ``unit="ms"``); naive values are UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise EventTimeError(
                f"event time {value!r} is not an ISO-8601 timestamp (expected {_FORMS})"
            ) from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if unit == "ms" else value
        if not math.isfinite(seconds):
            raise EventTimeError(f"event time {value!r} is not a finite number")
        try:
            if not _MIN_EPOCH <= seconds <= _MAX_EPOCH:
                raise OverflowError
            return datetime.fromtimestamp(seconds, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise EventTimeError(
                f"event time {value!r} is out of range for epoch "
                f"{'milliseconds' if unit == 'ms' else 'seconds'}"
            ) from None
    if value is None:
        raise EventTimeError(f"event time must be {_FORMS}, got None (missing)")
    raise EventTimeError(f"event time must be {_FORMS}, got {value!r}")


class EventClock:
    """Reads records' event times from ``time`` (a field name or a function)."""

    def __init__(self, time: TimeSpec, unit: TimeUnit = "s") -> None:
        self.time = time
        self.unit: TimeUnit = unit
        #: a record's raw time value (what :func:`event_time` reads)
        self.get: Callable[[Any], Any] = (
            operator.itemgetter(time) if isinstance(time, str) else time
        )

    def epoch_of(self, record: Any) -> float:
        """``record``'s event time in Unix epoch seconds (:class:`EventTimeError` when it
        has none or it cannot be read)."""
        try:
            raw = self.get(record)
        except (KeyError, IndexError, TypeError):
            if isinstance(self.time, str):
                raise EventTimeError(
                    f"record has no event time field {self.time!r} (window time=...)"
                ) from None
            raise
        if self.unit == "s" and type(raw) in (int, float) and _MIN_EPOCH <= raw <= _MAX_EPOCH:
            return float(raw)  # epoch seconds: no datetime needed
        return event_time(raw, self.unit).timestamp()

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

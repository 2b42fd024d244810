"""Event-time tumbling windows: the window start becomes part of the aggregate's key.

Window rows are upserted in place, so a late record simply updates its window's row
(unbounded allowed lateness); watermarks and a too-late side table are future work.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pgstream.errors import ConfigError
from pgstream.operators.keys import KeySpec

WINDOW_COLUMN = "window_start"


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Fixed-size, non-overlapping windows aligned to the Unix epoch."""

    size: timedelta

    def start_of(self, ts: datetime) -> datetime:
        """The start of the window holding ``ts``."""
        step = self.size.total_seconds()
        epoch = ts.timestamp()
        return datetime.fromtimestamp(epoch - epoch % step, timezone.utc)


def tumbling(*, seconds: float = 0, minutes: float = 0, hours: float = 0) -> Tumbling:
    """Tumbling windows of the given size: ``ps.tumbling(seconds=60)``."""
    size = timedelta(seconds=seconds, minutes=minutes, hours=hours)
    if size.total_seconds() <= 0:
        raise ConfigError("tumbling() needs a positive size, e.g. tumbling(seconds=60)")
    return Tumbling(size)


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


def windowed_key(key: KeySpec, window: Tumbling, time: str | Callable[[Any], Any]) -> KeySpec:
    """``key`` extended by the record's window start (column ``window_start``).

    Window starts are cached by their epoch second, so a batch builds one ``datetime`` per
    window rather than one per record.
    """
    get_time = operator.itemgetter(time) if isinstance(time, str) else time
    key_fn, single = key.fn, len(key.columns) == 1
    step = window.size.total_seconds()
    starts: dict[float, datetime] = {}

    def fn(record: Any) -> tuple[Any, ...]:
        epoch = event_time(get_time(record)).timestamp()
        floor = epoch - epoch % step
        start = starts.get(floor)
        if start is None:
            if len(starts) > 100_000:
                starts.clear()
            start = starts[floor] = datetime.fromtimestamp(floor, timezone.utc)
        k = key_fn(record)
        return (k, start) if single else (*k, start)

    return KeySpec((*key.columns, WINDOW_COLUMN), fn, key.by, (step, time))

"""Event-time tumbling windows: the window start becomes part of the aggregate's key.

A window spec (:class:`Tumbling`, what ``ps.tumbling()`` returns) makes an assigner
(:class:`TumblingAssigner`: event time -> window starts); the record's event time comes from an
:class:`~pgstream.operators.eventtime.EventClock`. :func:`windowed_key` composes the two with
the key function. Window rows are upserted in place, so a late record simply updates its
window's row (unbounded allowed lateness); watermarks are tracked by
:mod:`pgstream.operators.eventtime` and not yet consumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pgstream.errors import ConfigError
from pgstream.operators.eventtime import EventClock, event_time
from pgstream.operators.keys import KeySpec

WINDOW_COLUMN = "window_start"
#: window starts cached per assigner before the cache is emptied
_CACHED_STARTS = 100_000


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Fixed-size, non-overlapping windows aligned to the Unix epoch."""

    size: timedelta

    def assigner(self) -> TumblingAssigner:
        """A fresh assigner of event times to these windows."""
        return TumblingAssigner(self.size.total_seconds())


class TumblingAssigner:
    """Assigns an event time to the one tumbling window of ``step`` seconds holding it.

    Window starts are cached by their epoch second, so a batch builds one ``datetime`` per
    window rather than one per record.
    """

    def __init__(self, step: float) -> None:
        self.step = step
        starts: dict[float, datetime] = {}

        def start(epoch: float) -> datetime:
            floor = epoch - epoch % step
            found = starts.get(floor)
            if found is None:
                if len(starts) > _CACHED_STARTS:
                    starts.clear()
                found = starts[floor] = datetime.fromtimestamp(floor, timezone.utc)
            return found

        #: the start of the window holding an event time (epoch seconds)
        self.start: Callable[[float], datetime] = start

    def starts(self, epoch: float) -> tuple[datetime, ...]:
        """The starts of every window holding the event time ``epoch`` (one, for tumbling)."""
        return (self.start(epoch),)


def tumbling(*, seconds: float = 0, minutes: float = 0, hours: float = 0) -> Tumbling:
    """Tumbling windows of the given size: ``ps.tumbling(seconds=60)``."""
    size = timedelta(seconds=seconds, minutes=minutes, hours=hours)
    if size.total_seconds() <= 0:
        raise ConfigError("tumbling() needs a positive size, e.g. tumbling(seconds=60)")
    return Tumbling(size)


def windowed_key(key: KeySpec, window: Tumbling, clock: EventClock) -> KeySpec:
    """``key`` extended by the start of the record's window (column ``window_start``): the
    ``clock`` reads the record's event time, the window's assigner places it."""
    assigner = window.assigner()
    key_fn, single = key.fn, len(key.columns) == 1
    # ``clock.epoch_of`` inlined: this runs once per record
    get_time, start_of = clock.get, assigner.start

    def fn(record: Any) -> tuple[Any, ...]:
        start = start_of(event_time(get_time(record)).timestamp())
        k = key_fn(record)
        return (k, start) if single else (*k, start)

    return KeySpec(
        (*key.columns, WINDOW_COLUMN), fn, key.by, (assigner.step, clock.time), key.exprs
    )

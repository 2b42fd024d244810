"""Event-time windows: which windows a time falls into, and when a window is closed.

This module is the one owner of the window rules (a SQL pushdown of windows mirrors them):

* **Alignment.** Windows are aligned to the Unix epoch (UTC): a tumbling window of ``size``
  seconds starts at ``t - t % size``; a hopping window of ``size`` seconds every ``every``
  seconds starts at each multiple of ``every`` in ``(t - size, t]``, so a record belongs to
  every window ``[start, start + size)`` that contains its time ``t``.
* **Watermark.** Per partition and window operator, the largest event time among the records
  the operator accepted before, in offset order (:mod:`pgstream.operators.eventtime`).
* **Closed.** A window ``[start, end)`` is *closed* once ``end + grace < watermark``: it ended
  more than ``grace`` seconds before the watermark (:meth:`WindowSpec.closed`). A record for
  a closed window is *late*: it goes to ``pgstream.late_records`` instead of the window. With
  ``emit="final"`` a window's row is written once, in the batch whose watermark closes it.
  Without ``grace`` (``None``, update mode only) no window ever closes: every record updates
  its window, as before watermarks existed.

A window spec (:class:`Tumbling`, :class:`Hopping`) makes an assigner (event time -> window
starts); :func:`windowed_key` composes a tumbling assigner with the key function for the plain
keyed path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pgstream.errors import ConfigError
from pgstream.operators.eventtime import EventClock, event_time
from pgstream.operators.keys import KeySpec
from pgstream.operators.sessions import Session

WINDOW_COLUMN = "window_start"
#: window starts cached per assigner before the cache is emptied
_CACHED_STARTS = 100_000

Emit = Literal["update", "final"]


def _start_cache() -> Callable[[float], datetime]:
    """A function from a window start (epoch seconds) to its UTC datetime, cached."""
    starts: dict[float, datetime] = {}

    def as_datetime(floor: float) -> datetime:
        found = starts.get(floor)
        if found is None:
            if len(starts) > _CACHED_STARTS:
                starts.clear()
            found = starts[floor] = datetime.fromtimestamp(floor, timezone.utc)
        return found

    return as_datetime


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Fixed-size, non-overlapping windows aligned to the Unix epoch."""

    size: timedelta

    @property
    def seconds(self) -> float:
        """The window size in seconds."""
        return self.size.total_seconds()

    def assigner(self) -> TumblingAssigner:
        """A fresh assigner of event times to these windows."""
        return TumblingAssigner(self.seconds)

    def describe(self) -> dict[str, Any]:
        """The plan's description (as recorded before hopping windows existed)."""
        return {"tumbling_seconds": self.seconds}


@dataclass(frozen=True, slots=True)
class Hopping:
    """Windows of ``size`` starting every ``every``, aligned to the Unix epoch (they overlap
    when ``every < size``)."""

    size: timedelta
    every: timedelta

    @property
    def seconds(self) -> float:
        """The window size in seconds."""
        return self.size.total_seconds()

    def assigner(self) -> HoppingAssigner:
        """A fresh assigner of event times to these windows."""
        return HoppingAssigner(self.seconds, self.every.total_seconds())

    def describe(self) -> dict[str, Any]:
        """The plan's description."""
        return {"hopping_seconds": self.seconds, "every": self.every.total_seconds()}


WindowKind = Tumbling | Hopping | Session


class TumblingAssigner:
    """Assigns an event time to the one tumbling window of ``step`` seconds holding it.

    Window starts are cached by their epoch second, so a batch builds one ``datetime`` per
    window rather than one per record.
    """

    def __init__(self, step: float) -> None:
        self.step = step
        self.size = step
        as_datetime = _start_cache()
        #: a window start (epoch seconds) as a UTC datetime, cached
        self.as_datetime = as_datetime

        def start(epoch: float) -> datetime:
            return as_datetime(epoch - epoch % step)

        #: the start of the window holding an event time (epoch seconds)
        self.start: Callable[[float], datetime] = start

    def starts(self, epoch: float) -> tuple[datetime, ...]:
        """The starts of every window holding the event time ``epoch`` (one, for tumbling)."""
        return (self.start(epoch),)

    def epochs(self, epoch: float) -> tuple[float, ...]:
        """The starts (epoch seconds) of every window holding ``epoch``."""
        return (epoch - epoch % self.step,)


class HoppingAssigner:
    """Assigns an event time to every hopping window holding it, oldest first."""

    def __init__(self, size: float, every: float) -> None:
        self.size = size
        self.step = every
        self.as_datetime = _start_cache()

    def epochs(self, epoch: float) -> tuple[float, ...]:
        """The starts (epoch seconds) of every window ``[s, s + size)`` holding ``epoch``."""
        every, size = self.step, self.size
        s = epoch - epoch % every
        found = []
        while s > epoch - size:
            found.append(s)
            s -= every
        return tuple(reversed(found))

    def starts(self, epoch: float) -> tuple[datetime, ...]:
        """The starts of every window holding the event time ``epoch``, oldest first."""
        return tuple(self.as_datetime(s) for s in self.epochs(epoch))


Assigner = TumblingAssigner | HoppingAssigner


def _positive(name: str, size: timedelta, example: str) -> timedelta:
    if size.total_seconds() <= 0:
        raise ConfigError(f"{name}() needs a positive size, e.g. {example}")
    return size


def tumbling(*, seconds: float = 0, minutes: float = 0, hours: float = 0) -> Tumbling:
    """Tumbling windows of the given size: ``ps.tumbling(seconds=60)``."""
    size = timedelta(seconds=seconds, minutes=minutes, hours=hours)
    return Tumbling(_positive("tumbling", size, "tumbling(seconds=60)"))


def hopping(
    *, seconds: float = 0, minutes: float = 0, hours: float = 0, every: float
) -> Hopping:
    """Hopping windows of the given size starting every ``every`` seconds:
    ``ps.hopping(seconds=60, every=10)`` (a record belongs to every window holding it)."""
    size = timedelta(seconds=seconds, minutes=minutes, hours=hours)
    _positive("hopping", size, "hopping(seconds=60, every=10)")
    step = timedelta(seconds=every)
    if not 0 < step.total_seconds() <= size.total_seconds():
        raise ConfigError(
            f"hopping(every={every!r}) must be positive and at most the window size "
            f"({size.total_seconds():g} s)",
            hint="e.g. hopping(seconds=60, every=10): 60 s windows starting every 10 s",
        )
    return Hopping(size, step)


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """A ``window(...)`` call: the windows, the clock, the lateness bound and the emit mode."""

    kind: WindowKind
    clock: EventClock
    #: seconds a window stays open after its end, measured against the watermark (None: never
    #: closes; update mode only)
    grace: float | None = None
    emit: Emit = "update"
    #: seconds without a commit after which a partition stops holding back the job watermark
    idle_timeout: float | None = None
    #: the key without its window (what ``key_by`` built)
    key: KeySpec | None = None

    def closed(self, end: float, watermark: float | None) -> bool:
        """Whether the window ending at ``end`` is closed at ``watermark`` (see the module
        doc): a record for it is late; its final row is due."""
        grace = self.grace
        return grace is not None and watermark is not None and end + grace < watermark

    @property
    def plain(self) -> bool:
        """Tumbling, update mode, no grace: the windows of before watermarks (nothing late)."""
        return isinstance(self.kind, Tumbling) and self.grace is None and self.emit == "update"

    @property
    def keeps_state(self) -> bool:
        """Whether the operator keeps windows in ``pgstream.state`` (final mode, sessions)."""
        return self.emit == "final" or isinstance(self.kind, Session)

    def describe(self) -> dict[str, Any]:
        """The extra plan entries of this window (only those that differ from the defaults,
        so a plain tumbling window's plan is what it was before)."""
        extra: dict[str, Any] = {}
        if isinstance(self.kind, Hopping):
            extra["every"] = self.kind.every.total_seconds()
        if isinstance(self.kind, Session):
            extra["session_gap"] = self.kind.seconds
        if self.grace is not None:
            extra["grace"] = self.grace
        if self.emit != "update":
            extra["emit"] = self.emit
        if self.idle_timeout is not None:
            extra["idle_timeout"] = self.idle_timeout
        if self.clock.unit != "s":
            extra["time_unit"] = self.clock.unit
        return extra


def windowed_key(key: KeySpec, window: WindowKind, clock: EventClock) -> KeySpec:
    """``key`` extended by the start of the record's window (column ``window_start``): the
    ``clock`` reads the record's event time, the window's assigner places it (the first window
    holding it, for hopping windows: their records go through a window plan instead; for
    sessions the record's own time: their records go through a session plan)."""
    if isinstance(window, Session):
        return _session_key(key, window, clock)
    assigner = window.assigner()
    key_fn, single = key.fn, len(key.columns) == 1
    as_datetime = assigner.as_datetime
    epochs = assigner.epochs
    if clock.unit == "s" and isinstance(assigner, TumblingAssigner):
        # ``clock.epoch_of`` inlined: this runs once per record
        get_time, start_of = clock.get, assigner.start

        def fn(record: Any) -> tuple[Any, ...]:
            start = start_of(event_time(get_time(record)).timestamp())
            k = key_fn(record)
            return (k, start) if single else (*k, start)

    else:
        epoch_of = clock.epoch_of

        def fn(record: Any) -> tuple[Any, ...]:
            start = as_datetime(epochs(epoch_of(record))[0])
            k = key_fn(record)
            return (k, start) if single else (*k, start)

    return KeySpec(
        (*key.columns, WINDOW_COLUMN), fn, key.by, (window.seconds, clock.time), key.exprs
    )


def _session_key(key: KeySpec, window: Session, clock: EventClock) -> KeySpec:
    """``key`` extended by ``window_start``: the session's start (placed by the session plan,
    :mod:`pgstream.runtime.sessionplan`; ``fn`` gives a record's own session only)."""
    key_fn, single = key.fn, len(key.columns) == 1
    epoch_of, as_datetime = clock.epoch_of, _start_cache()

    def fn(record: Any) -> tuple[Any, ...]:
        start = as_datetime(epoch_of(record))
        k = key_fn(record)
        return (k, start) if single else (*k, start)

    return KeySpec(
        (*key.columns, WINDOW_COLUMN), fn, key.by, (window.seconds, clock.time), key.exprs
    )

"""Session windows: per key, a session is a maximal run of records whose event times are less
than ``gap`` seconds apart. This module is the one owner of the session rules:

* **Joining.** A record at time ``t`` joins every session ``s`` of its key with
  ``s.start - gap < t < s.last + gap`` (``last``: the session's latest event time). A record
  that joins several sessions bridges them: they merge into one (accumulators merged exactly,
  :meth:`~pgstream.operators.aggregates.Aggregate.merge`), starting at the earliest start.
* **End.** A session's ``window_end`` is ``last + gap``: the earliest time a record of the key
  no longer extends it.
* **Closed.** A session is closed once ``last + gap + grace < watermark`` (the same rule as any
  window, with ``end = last + gap``). A record is *late* when the session of that record alone
  would be closed (``t + gap + grace < watermark``) or when it would join a closed session; it
  goes to ``pgstream.late_records`` with that session's start and end.
* **Forgetting.** A closed session is kept (without accumulators) while a record that is not
  late could still join it, i.e. until ``last + 2 * gap + grace < watermark``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from pgstream.errors import ConfigError
from pgstream.operators.aggregates import Aggregate


@dataclass(frozen=True, slots=True)
class Session:
    """Session windows of one key, closed by a ``gap`` of inactivity."""

    gap: timedelta

    @property
    def seconds(self) -> float:
        """The gap in seconds."""
        return self.gap.total_seconds()

    def describe(self) -> dict[str, Any]:
        """The plan's description."""
        return {"session_gap": self.seconds}


def session(*, gap: float) -> Session:
    """Session windows: ``ps.session(gap=300)`` (a key's records less than 300 s apart form one
    session; a record bridging two sessions merges them)."""
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap > 0:
        raise ConfigError(
            f"session(gap={gap!r}) needs a positive number of seconds",
            hint="e.g. session(gap=300): records less than 5 minutes apart form one session",
        )
    return Session(timedelta(seconds=gap))


@dataclass(frozen=True, slots=True)
class Run:
    """One session of a key: its first and last event time and its accumulators (None once
    closed: kept only so that records joining it are late)."""

    start: float
    last: float
    accs: tuple[Any, ...] | None

    def to_json(self) -> list[Any]:
        """The JSON form kept in ``pgstream.state`` (a ``Decimal`` or datetime accumulator
        tagged, so it comes back as it was)."""
        accs = None if self.accs is None else [_tag(a) for a in self.accs]
        return [self.start, self.last, accs]

    @staticmethod
    def from_json(value: list[Any]) -> Run:
        """A run read back from ``pgstream.state``."""
        start, last, accs = value
        return Run(
            float(start), float(last), None if accs is None else tuple(_untag(a) for a in accs)
        )


def _tag(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, (tuple, list)):  # avg: (total, count)
        return [_tag(v) for v in value]
    return value


def _untag(value: Any) -> Any:
    if isinstance(value, dict):
        if "decimal" in value:
            return Decimal(value["decimal"])
        return datetime.fromisoformat(value["datetime"])
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


Runs = tuple[Run, ...]


@dataclass(frozen=True, slots=True)
class SessionRules:
    """The rules of the module doc for one ``window(ps.session(gap=...), grace=...)``."""

    gap: float
    grace: float
    aggs: tuple[Aggregate, ...]

    def end(self, run: Run) -> float:
        """A session's ``window_end``."""
        return run.last + self.gap

    def closed(self, run: Run, watermark: float | None) -> bool:
        """Whether the session is closed at ``watermark``."""
        return watermark is not None and run.last + self.gap + self.grace < watermark

    def late(self, runs: Runs, t: float, watermark: float | None) -> tuple[float, float] | None:
        """The (start, end) of the closed session a record at ``t`` would belong to, or None
        when it is not late."""
        if watermark is None:
            return None
        if t + self.gap + self.grace < watermark:
            return (t, t + self.gap)
        for run in runs:
            if self._joins(run, t) and self.closed(run, watermark):
                return (run.start, self.end(run))
        return None

    def _joins(self, run: Run, t: float) -> bool:
        return run.start - self.gap < t < run.last + self.gap

    def add(self, runs: Runs, t: float, inputs: Sequence[Any]) -> Runs:
        """The key's sessions after a record (not late) at ``t`` with aggregate ``inputs``."""
        aggs = self.aggs
        joined = [r for r in runs if self._joins(r, t)]
        acc = [a.start(x) for a, x in zip(aggs, inputs)]
        start, last = t, t
        for r in joined:
            assert r.accs is not None  # a closed session makes the record late
            acc = [a.merge(c, d) for a, c, d in zip(aggs, r.accs, acc)]
            start, last = min(start, r.start), max(last, r.last)
        merged = Run(start, last, tuple(acc))
        kept = [r for r in runs if not any(r is j for j in joined)]
        kept.append(merged)
        kept.sort(key=lambda r: r.start)
        return tuple(kept)

    def expire(self, runs: Runs, watermark: float | None) -> tuple[Runs, list[Run]]:
        """The sessions still kept at ``watermark`` (closed ones without accumulators,
        forgotten ones dropped) and the open sessions the watermark closes now."""
        if watermark is None:
            return runs, []
        kept: list[Run] = []
        closing: list[Run] = []
        for r in runs:
            if r.last + 2 * self.gap + self.grace < watermark:
                if r.accs is not None:
                    closing.append(r)
                continue
            if r.accs is not None and self.closed(r, watermark):
                closing.append(r)
                kept.append(Run(r.start, r.last, None))
            else:
                kept.append(r)
        return tuple(kept), closing

    def deadline(self, runs: Runs) -> float:
        """The watermark above which :meth:`expire` changes ``runs``."""
        return min(
            r.last + self.gap + self.grace + (self.gap if r.accs is None else 0) for r in runs
        )

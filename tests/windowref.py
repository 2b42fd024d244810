"""An offline reference for event-time windows, computed from the input and the documented
rules alone (README "Event time"; :mod:`pgstream.operators.windows`), independently of
pgstream's operators: per partition, in offset order, the watermark is the largest event time
of the records accepted before; a window [start, start + size) is closed once
end + grace < watermark; a record for a closed window is late (when every window of it is
closed its key and inputs are not read; otherwise a failing key or input makes the whole
record a dead letter); emit="final" writes a window once its partition's final watermark
closes it."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: (key, window start epoch) -> (count, sum)
Windows = dict[tuple[Any, float], tuple[int, int]]
#: (partition, offset, window start epoch)
LateKey = tuple[str, int, float]


@dataclass
class Reference:
    windows: Windows = field(default_factory=dict)
    late: set[LateKey] = field(default_factory=set)
    dead: set[tuple[str, int]] = field(default_factory=set)
    #: partition -> final watermark
    marks: dict[str, float] = field(default_factory=dict)
    #: windows per partition that the final watermark closed
    closed: dict[tuple[Any, float], bool] = field(default_factory=dict)


def starts(t: float, size: float, every: float) -> list[float]:
    """Every window start s (a multiple of ``every``) with s <= t < s + size."""
    s = t - t % every
    found = []
    while s > t - size:
        found.append(s)
        s -= every
    return sorted(found)


def file_records(lines: list[str]) -> Iterable[tuple[int, str]]:
    """(byte offset, line) of a file source's lines."""
    offset = 0
    for line in lines:
        yield offset, line
        offset += len(line.encode()) + 1


def reference(
    partitions: dict[str, list[tuple[int, str]]],
    *,
    size: float,
    every: float | None = None,
    grace: float | None,
    final: bool = False,
    time_field: str = "ts",
    scale: float = 1.0,
) -> Reference:
    """The windows (count, sum of "v") per (user, start), the late records and dead letters."""
    every = every or size
    ref = Reference()
    sums: dict[tuple[Any, float], list[int]] = defaultdict(lambda: [0, 0])
    owner: dict[tuple[Any, float], str] = {}
    for part, records in partitions.items():
        wm: float | None = None
        for offset, line in records:
            try:
                rec = json.loads(line)
                t = float(rec[time_field]) / scale
            except (ValueError, KeyError, TypeError):
                ref.dead.add((part, offset))
                continue
            mine = starts(t, size, every)
            closed = [
                s for s in mine if grace is not None and wm is not None and s + size + grace < wm
            ]
            ref.late.update((part, offset, s) for s in closed)
            if len(closed) == len(mine):
                continue  # late for every window: its key and inputs are not read
            try:
                user, v = rec["user"], int(rec["v"])
            except (ValueError, KeyError, TypeError):
                ref.late.difference_update((part, offset, s) for s in closed)
                ref.dead.add((part, offset))
                continue
            for s in mine:
                if s not in closed:
                    acc = sums[(user, s)]
                    acc[0] += 1
                    acc[1] += v
                    owner[(user, s)] = part
            wm = t if wm is None or t > wm else wm
        if wm is not None:
            ref.marks[part] = wm
    for k, (n, total) in sums.items():
        mark = ref.marks.get(owner[k])
        done = grace is not None and mark is not None and k[1] + size + grace < mark
        ref.closed[k] = done
        if not final or done:
            ref.windows[k] = (n, total)
    return ref


@dataclass
class SessionReference:
    """Sessions per (user, start): (count, sum of "v"), their ends, late records, dead letters."""

    windows: Windows = field(default_factory=dict)
    #: (user, start) -> last event time + gap
    ends: dict[tuple[Any, float], float] = field(default_factory=dict)
    late: set[LateKey] = field(default_factory=set)
    dead: set[tuple[str, int]] = field(default_factory=set)
    marks: dict[str, float] = field(default_factory=dict)


def session_reference(
    partitions: dict[str, list[tuple[int, str]]],
    *,
    gap: float,
    grace: float,
    final: bool = False,
    time_field: str = "ts",
) -> SessionReference:
    """Session windows by the README rules, keeping every session ever seen (never forgetting
    closed ones): a record joins each session of its user with start - gap < t < last + gap and
    merges them; it is late when t + gap + grace < watermark (window: its own) or when a
    session it joins has last + gap + grace < watermark (window: the first such by start)."""
    ref = SessionReference()
    # user -> [start, last, count, sum]
    found: dict[Any, list[list[Any]]] = defaultdict(list)
    mark_of: dict[Any, str] = {}
    for part, records in partitions.items():
        wm: float | None = None
        for offset, line in records:
            try:
                rec = json.loads(line)
                t = float(rec[time_field])
            except (ValueError, KeyError, TypeError):
                ref.dead.add((part, offset))
                continue
            if wm is not None and t + gap + grace < wm:
                ref.late.add((part, offset, t))
                continue
            try:
                user = rec["user"]
            except KeyError:
                ref.dead.add((part, offset))
                continue
            mine = sorted(found[user])
            joined = [s for s in mine if s[0] - gap < t < s[1] + gap]
            closed = [s for s in joined if wm is not None and s[1] + gap + grace < wm]
            if closed:
                ref.late.add((part, offset, closed[0][0]))
                continue
            try:
                v = int(rec["v"])
            except (ValueError, KeyError, TypeError):
                ref.dead.add((part, offset))
                continue
            merged = [min([t] + [s[0] for s in joined]), max([t] + [s[1] for s in joined]),
                      1 + sum(s[2] for s in joined), v + sum(s[3] for s in joined)]
            found[user] = [s for s in mine if s not in joined] + [merged]
            mark_of[user] = part
            wm = t if wm is None or t > wm else wm
        if wm is not None:
            ref.marks[part] = wm
    for user, sessions in found.items():
        mark = ref.marks[mark_of[user]]
        for start, last, n, total in sessions:
            if not final or last + gap + grace < mark:
                ref.windows[(user, start)] = (n, total)
                ref.ends[(user, start)] = last + gap
    return ref

"""Window rules alone: hopping windows, time units and errors, the window options, and the
tumbling update kernel against the general evaluation (same windows, late records,
watermark and dead letters, including records that fail after their time was read)."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.operators.eventtime import EventClock, EventTimeError
from pgstream.runtime.pipeline import Pipeline, new_states
from pgstream.runtime.windowplan import WindowPlan, WindowSlot
from pgstream.sinks.upsert import AggregateSink
from pgstream.sources.base import SourceRecord
from pgstream.sources.raw import JsonPayloads
from pgstream.state.windows import WindowState


def test_a_hopping_window_holds_every_time_within_its_size() -> None:
    a = ps.hopping(seconds=60, every=20).assigner()
    assert a.epochs(125.0) == (80.0, 100.0, 120.0)
    assert a.epochs(120.0) == (80.0, 100.0, 120.0)
    assert a.epochs(119.999) == (60.0, 80.0, 100.0)
    assert ps.hopping(seconds=60, every=60).assigner().epochs(61.0) == (60.0,)
    with pytest.raises(ConfigError, match="at most the window size"):
        ps.hopping(seconds=10, every=20)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({}, "no event time field 'ts'"),
        ({"ts": None}, "got None"),
        ({"ts": "yesterday"}, "not an ISO-8601 timestamp"),
        ({"ts": float("nan")}, "not a finite number"),
        ({"ts": 10**20}, "out of range"),
    ],
)
def test_a_missing_or_unreadable_time_names_the_problem(record: Any, message: str) -> None:
    with pytest.raises(EventTimeError, match=message):
        EventClock("ts").epoch_of(record)


def test_epoch_milliseconds_and_a_time_function() -> None:
    assert EventClock("ts", "ms").epoch_of({"ts": 1_700_000_000_500}) == 1_700_000_000.5
    assert EventClock(lambda r: r["at"] * 2).epoch_of({"at": 5}) == 10.0


def test_window_options_are_checked() -> None:
    app = ps.App("x")
    keyed = app.stream("s", ps.FileSource("/tmp/x.jsonl")).key_by("user")
    for bad, match in (
        ({"emit": "sometimes"}, "emit is"),
        ({"grace": -1}, "grace=-1"),
        ({"time_unit": "us"}, "time_unit is"),
        ({"idle_timeout": "soon"}, "idle_timeout"),
    ):
        with pytest.raises(ConfigError, match=match):
            keyed.window(ps.tumbling(seconds=60), time="ts", **bad)
    final = keyed.window(ps.tumbling(seconds=60), time="ts", emit="final")
    assert final.window_spec is not None and final.window_spec.grace == 0.0


def _plan(**window: Any) -> Pipeline:
    app = ps.App("k")
    app.stream("s", ps.FileSource("/tmp/x.jsonl")).key_by("user").window(
        ps.tumbling(seconds=10), time="ts", **window
    ).aggregate(n=ps.count(), total=ps.sum("v")).to_table("t")
    sink = AggregateSink("t", ("user", "window_start"), app.sinks[0].aggregates, "stage_t")
    return Pipeline(app, "s", "0", {"t": sink}, new_states(app, "s", "0"))


def _records(seed: int) -> list[SourceRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(3000):
        rec: dict[str, Any] = {"user": rng.randrange(4), "v": rng.randrange(9), "ts": i / 10}
        rec["ts"] -= rng.random() * 60 if rng.random() < 0.1 else rng.random() * 3
        if rng.random() < 0.02:
            del rec["v"]  # fails after its time was read: must not move the watermark
        if rng.random() < 0.01:
            rec["ts"] = "never"
        out.append(SourceRecord(i, rec))
    return out


def _slot(p: Pipeline, records: list[SourceRecord], general: bool) -> tuple[Any, ...]:
    if general:
        p._records_kernel = None
    plan = p.plans[0]
    assert isinstance(plan, WindowPlan)
    marks: list[float | None] = []
    late: list[Any] = []
    dead: list[int] = []
    accs: dict[Any, list[Any]] = {}
    for i in range(0, len(records), 250):
        out = p.evaluate(records[i : i + 250])
        slot: WindowSlot = out.slots[plan.slot]
        marks.append(slot.watermark)
        late += [row[:6] for row in slot.late]
        dead += [d.offset for d in out.dead]
        for k, acc in slot.accs.items():
            prev = accs.get(k)
            accs[k] = acc if prev is None else [prev[0] + acc[0], prev[1] + acc[1]]
        p.committed(out)
    return marks, late, dead, accs


def test_the_tumbling_update_kernel_equals_the_general_evaluation() -> None:
    records = _records(seed=2)
    fast = _plan(grace=2)
    assert fast._records_kernel is not None
    got = _slot(fast, records, general=False)
    want = _slot(_plan(grace=2), records, general=True)
    assert got == want
    assert got[1] and got[2]  # late records and dead letters both occur


def test_the_raw_kernel_equals_the_records_kernel() -> None:
    records = _records(seed=3)
    payloads = [orjson.dumps(r.value) for r in records]
    offsets = [r.offset for r in records]
    batch = JsonPayloads(payloads, offsets, 0, len(records))
    out = _plan(grace=2).evaluate_raw(batch)
    ref = _plan(grace=2).evaluate(records)
    a: WindowSlot = out.slots[0]
    b: WindowSlot = ref.slots[0]
    assert (a.accs, a.late, a.watermark) == (b.accs, b.late, b.watermark)
    assert [d.offset for d in out.dead] == [d.offset for d in ref.dead]


def _final_pipeline(state: dict[str, bytes] | None = None, wm: float | None = None) -> Pipeline:
    app = ps.App("k")
    app.stream("s", ps.FileSource("/tmp/x.jsonl")).key_by(["user", "shop"]).window(
        ps.hopping(seconds=10, every=5), time="ts", grace=1, emit="final"
    ).aggregate(n=ps.count(), total=ps.sum("v")).to_table("t")
    sink = AggregateSink("t", ("user", "shop", "window_start"), app.sinks[0].aggregates, "st")
    states = new_states(app, "s", "0")
    window_state = states["window:t"]
    assert isinstance(window_state, WindowState)
    window_state.values = dict(state or {})
    window_state.watermark = wm
    return Pipeline(app, "s", "0", {"t": sink}, states)


def test_final_windows_continue_after_a_takeover_as_if_nothing_happened() -> None:
    rng = random.Random(4)
    records = []
    for i in range(600):
        ts = i / 7 - rng.random() * (9 if i % 20 == 0 else 1)
        records.append(SourceRecord(i, {"user": i % 3, "shop": "ab"[i % 2], "v": i, "ts": ts}))
    one = _final_pipeline()
    plan = one.plans[0]
    assert isinstance(plan, WindowPlan)
    first = one.evaluate(records[:300])
    one.committed(first)
    # a new owner loads what the batch transaction wrote: open windows and the watermark
    stored = {plan._state_key(sk): orjson.dumps(acc) for sk, acc in plan._open().items()}
    two = _final_pipeline(stored, plan.state.watermark)
    assert two.plans[0]._open() == plan._open()  # type: ignore[attr-defined]
    a, b = one.evaluate(records[300:]), two.evaluate(records[300:])
    assert plan.emitted(a) == two.plans[0].emitted(b)  # type: ignore[attr-defined]
    assert a.slots[0].late == b.slots[0].late and a.slots[0].late
    assert plan.emitted(a)


def test_windows_with_a_watermark_are_not_shared_between_streams() -> None:
    app = ps.App("u")
    for name in ("a", "b"):
        keyed = app.stream(name, ps.FileSource(f"/tmp/{name}.jsonl")).key_by("user")
        plain = keyed.window(ps.tumbling(seconds=60), time="ts")
        plain.aggregate(n=ps.count()).to_table("shared")  # plain windows: a union is fine
    graced = app.stream("c", ps.FileSource("/tmp/c.jsonl")).key_by("user")
    graced.window(ps.tumbling(seconds=60), time="ts", grace=5).aggregate(n=ps.count()).to_table(
        "own"
    )
    other = app.stream("d", ps.FileSource("/tmp/d.jsonl")).key_by("user")
    with pytest.raises(ConfigError, match="never shared"):
        other.window(ps.tumbling(seconds=60), time="ts", grace=5).aggregate(
            n=ps.count()
        ).to_table("own")

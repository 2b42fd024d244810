"""Repartitioning without a database: the stable partition of a key, what the first stage
hands over, the second stage's fold, and the repartition in the recorded plan."""

from __future__ import annotations

from typing import Any

import orjson

import pgstream as ps
from pgstream import plan as plans
from pgstream.runtime.output import BatchOutput
from pgstream.runtime.repartition import RepartitionedFoldPlan, RepartitionPlan
from pgstream.sinks.upsert import UpsertSink
from pgstream.sources.repartition import partition_of
from pgstream.state.store import KeyedState


def test_the_partition_of_a_key_is_fixed_forever() -> None:
    # CRC-32 of the key's JSON: these values must never change (stored rows depend on them)
    assert [partition_of(k, 8) for k in (b"42", b'"alice"', b'[1,"x"]')] == [0, 6, 2]
    assert all(partition_of(orjson.dumps(k), 1) == 0 for k in range(50))


def build(*, factor: int = 1, partitions: int | None = None, glob: str = "/d/*.jsonl") -> ps.App:
    app = ps.App("shop")
    orders = app.stream("orders", ps.FileSource(glob))
    keyed = (
        orders.map(lambda o: {**o, "n": o["amount"] * 1})
        if factor == 1
        else orders.map(lambda o: {**o, "n": o["amount"] * 2})
    ).key_by(["region", "user_id"])
    keyed.fold({"c": 0}, lambda s, o: {"c": s["c"] + o["n"]}, partitions=partitions).to_table(
        "counts"
    )
    return app


def _out(plan: Any, source: str, partition: str) -> BatchOutput:
    plan.slot = 0
    return BatchOutput(source=source, partition=partition, slots=[plan.new_slot()])


def test_first_stage_hands_over_key_payload_and_position() -> None:
    app = build(partitions=4)
    (spec,) = app.sinks
    plan = RepartitionPlan(app.name, spec)
    out = _out(plan, "orders", "a.jsonl")
    for offset, rec in enumerate(
        [{"region": "eu", "user_id": 7, "amount": 3}, {"region": "us", "user_id": 7, "amount": 1}]
    ):
        plan.apply(plan.stage(rec, out), offset * 10, out)
    rows = plan._rows(out)
    assert [(r[0], r[1], r[3], r[5], r[6], r[7], r[8]) for r in rows] == [
        ("shop", "orders:fold:counts:repartition", '["eu",7]', "orders", "a.jsonl", 0, 0),
        ("shop", "orders:fold:counts:repartition", '["us",7]', "orders", "a.jsonl", 10, 0),
    ]
    assert [r[2] for r in rows] == [partition_of(b'["eu",7]', 4), partition_of(b'["us",7]', 4)]
    assert orjson.loads(rows[0][4]) == {"region": "eu", "user_id": 7, "amount": 3, "n": 3}


def test_second_stage_folds_the_payload_under_the_handed_over_key() -> None:
    app = build()
    (spec,) = app.sinks
    sink = UpsertSink("counts", ("region", "user_id"), "stage")
    state = KeyedState(app.name, spec.operator_id, "0")
    plan = RepartitionedFoldPlan(spec, sink, state)
    out = _out(plan, spec.stream, "0")
    for offset in range(3):
        value = {"key": ["eu", 7], "payload": {"n": offset + 1}}
        plan.apply(plan.stage(value, out), offset, out)
    ((key, blob),) = out.slots[0].values()
    assert key == ("eu", 7) and orjson.loads(blob) == {"c": 6}


def test_the_plan_records_the_repartition_and_diff_names_its_changes() -> None:
    base = plans.describe(build())
    (sink,) = base["sinks"]
    assert sink["stream"] == "orders:fold:counts:repartition" and sink["steps"] == []
    assert sink["repartition"]["from"] == "orders"
    assert sink["repartition"]["partitions"] == 8 and len(sink["repartition"]["steps"]) == 1
    assert base["streams"]["orders:fold:counts:repartition"] == {
        "source": "repartition of orders into 8 partitions"
    }
    assert plans.diff(base, plans.describe(build())) == []

    changed = plans.diff(base, plans.describe(build(factor=2)))
    assert [c.kind for c in changed] == ["code-changed"]
    assert "before its repartition" in changed[0].what

    resized = plans.diff(base, plans.describe(build(partitions=3)))
    kinds = sorted(c.kind for c in resized)
    assert kinds == ["key-changed", "source-changed"], resized
    assert any("in 8 partitions" in c.what and "in 3" in c.what for c in resized)


def test_no_repartition_over_one_partition() -> None:
    (sink,) = plans.describe(build(glob="/d/one.jsonl"))["sinks"]
    assert "repartition" not in sink and sink["stream"] == "orders"

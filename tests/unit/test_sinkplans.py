"""Sink plans: each kind evaluates into its own slot, says what verify must find, and is
written by commit_batch in the batch transaction's fixed order."""

from __future__ import annotations

from typing import Any

import pytest

import pgstream as ps
from pgstream.db import queries
from pgstream.runtime.checkpoint import BatchRange, commit_batch
from pgstream.runtime.output import BatchOutput
from pgstream.runtime.pipeline import Pipeline
from pgstream.runtime.sinkplans import (
    AggregatePlan,
    AppendPlan,
    Expectations,
    FoldPlan,
    HandlerPlan,
    SinkPlan,
    aggregate_row,
)
from pgstream.runtime.worker import build_sinks
from pgstream.sinks.append import make_row, split_row
from pgstream.sources.base import SourceRecord
from pgstream.state.store import KeyedState


def every_kind_app() -> ps.App:
    """One stream into each kind of plan, declared in an order unlike the write order."""
    app = ps.App("plans")
    s = app.stream("s", ps.FileSource("unused.jsonl"))
    s.key_by("k").fold(0, lambda n, r: n + r["v"], name="running").to_table("running")
    s.key_by("k").aggregate(n=ps.count(), total=ps.sum("v"), mean=ps.avg("v")).to_table("totals")
    s.flat_map(lambda r: [{"k": r["k"]}, {"v": r["v"]}]).to_table("facts")

    @app.batch(s)
    def handler(batch: ps.Batch) -> None:
        pass

    return app


def pipeline_of(app: ps.App) -> Pipeline:
    states = {"running": KeyedState(app.name, "running", "0")}
    return Pipeline(app, "s", "0", build_sinks(app), states)


def records(*values: tuple[int, str, int]) -> list[SourceRecord]:
    return [SourceRecord(off, {"k": k, "v": v}) for off, k, v in values]


def test_plans_are_in_write_order_and_own_their_slots() -> None:
    p = pipeline_of(every_kind_app())
    kinds = [type(plan) for plan in p.plans]
    assert kinds == [AppendPlan, AggregatePlan, FoldPlan, HandlerPlan]
    assert [plan.slot for plan in p.plans] == [0, 1, 2, 3]
    out = p.evaluate(records((10, "a", 1), (20, "b", 2), (35, "a", 4)))
    append, accs, overlay, handled = out.slots
    assert append == {
        ("k",): [make_row(["a"], "s", "0", 10, 0), make_row(["b"], "s", "0", 20, 0),
                 make_row(["a"], "s", "0", 35, 0)],
        ("v",): [make_row([1], "s", "0", 10, 1), make_row([2], "s", "0", 20, 1),
                 make_row([4], "s", "0", 35, 1)],
    }
    assert accs == {"a": [2, 5, (5, 2)], "b": [1, 2, (2, 1)]}
    assert {kj: blob for kj, (_, blob) in overlay.items()} == {'"a"': b"5", '"b"': b"2"}
    assert handled == [{"k": "a", "v": 1}, {"k": "b", "v": 2}, {"k": "a", "v": 4}]
    assert p.per_record_output


def test_a_failing_record_leaves_no_trace_in_any_slot() -> None:
    p = pipeline_of(every_kind_app())
    out = p.evaluate([SourceRecord(1, {"k": "a", "v": 1}), SourceRecord(2, {"k": "a"})])
    assert [d.offset for d in out.dead] == [2]
    assert out.slots[1] == {"a": [1, 1, (1, 1)]}
    assert out.slots[3] == [{"k": "a", "v": 1}]


def test_each_plan_reports_what_verify_must_find() -> None:
    p = pipeline_of(every_kind_app())
    expected = Expectations()
    for batch in (records((10, "a", 1), (20, "b", 2)), records((30, "a", 4))):
        out = p.evaluate(batch)
        for plan in p.plans:
            plan.committed(out)
            plan.expect(out, "0", expected)
    assert expected.rows["facts"][("s", "0", 30, 1)] == (("v",), (4,))
    assert len(expected.rows["facts"]) == 6
    # deltas of both batches merged with Aggregate.merge
    assert expected.accumulators["totals"] == {"a": [2, 5, (5, 2)], "b": [1, 2, (2, 1)]}
    agg = p.plans[1]
    assert isinstance(agg, AggregatePlan)
    assert aggregate_row(agg.key, agg.aggs, "a", [2, 5, (5, 2)]) == ("a", 2, 5, 2.5, 5, 2)
    assert expected.folds["running"] == {("0", '"a"'): (("a",), 5), ("0", '"b"'): (("b",), 2)}
    assert expected.states == {("running", "0", '"a"'): 5, ("running", "0", '"b"'): 2}


def test_a_fold_continues_from_the_pending_batch_only() -> None:
    p = pipeline_of(every_kind_app())
    first = p.evaluate(records((1, "a", 1)))
    second = p.evaluate(records((2, "a", 10)), pending=first)
    assert second.pending is not None and set(second.pending) == {2}  # the fold's slot only
    assert second.slots[2]['"a"'][1] == b"11"


def test_split_row_inverts_make_row() -> None:
    row = make_row(iter([1, "x", None]), "src", "p", 42, 3)
    assert split_row(row) == ((1, "x", None), ("src", "p", 42, 3))


# -- commit_batch visits plans in order ---------------------------------------------------------


class FakeCursor:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, query: Any, params: Any = None) -> FakeCursor:
        names = {queries.CHECKPOINT: "checkpoint", queries.LEDGER: "ledger"}
        self.log.append(names.get(query, str(query)))
        return self

    def fetchone(self) -> tuple[int]:
        return (1,)


class FakeConnection:
    def __init__(self) -> None:
        self.log: list[str] = []

    def cursor(self) -> FakeCursor:
        return FakeCursor(self.log)

    def execute(self, query: str) -> None:
        self.log.append(query)


class RecordingPlan(SinkPlan):
    """A new plan kind is one class: this one only records what the transaction asks of it."""

    ORDER = 9

    def __init__(self, name: str, log: list[str]) -> None:
        self.label = name
        self.log = log

    def new_slot(self) -> None:
        return None

    def stage(self, value: Any, out: BatchOutput) -> None:
        return None

    def apply(self, staged: Any, offset: int, out: BatchOutput) -> None:
        return None

    def write_state(self, cur: Any, out: BatchOutput) -> None:
        self.log.append(f"{self.label}.state")

    def write_sink(self, cur: Any, out: BatchOutput, tolerate_duplicates: bool) -> int:
        self.log.append(f"{self.label}.sink")
        return 2

    def run_handler(self, cur: Any, rng: BatchRange, out: BatchOutput) -> None:
        self.log.append(f"{self.label}.handler")


def test_commit_batch_writes_state_then_sinks_then_handlers_plan_by_plan() -> None:
    conn = FakeConnection()
    p = pipeline_of(every_kind_app())
    p.plans = [RecordingPlan("one", conn.log), RecordingPlan("two", conn.log)]
    out = BatchOutput("s", "0", [None, None])
    rng = BatchRange("plans", "s", "0", 1, "w", None, 0, 10, 10, 1)
    written = commit_batch(conn, p, rng, out, lease_seconds=30)  # type: ignore[arg-type]
    assert written == 4
    assert conn.log == [
        "BEGIN", "checkpoint",
        "one.state", "two.state",
        "one.sink", "two.sink",
        "one.handler", "two.handler",
        "ledger", "COMMIT",
    ]


@pytest.mark.parametrize("kind", ["append", "aggregate", "fold"])
def test_every_sink_spec_kind_has_a_plan(kind: str) -> None:
    p = pipeline_of(every_kind_app())
    by_kind = {"append": AppendPlan, "aggregate": AggregatePlan, "fold": FoldPlan}
    assert any(isinstance(plan, by_kind[kind]) for plan in p.plans)

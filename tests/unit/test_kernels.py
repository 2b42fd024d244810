"""The fused single-plan kernels produce exactly what the general evaluation loop produces:
the same rows, the same accumulators, the same dead letters (offset, payload, error text)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

import pgstream as ps
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.runtime.worker import build_sinks
from pgstream.sources.base import SourceRecord
from pgstream.sources.file import JsonLines
from pgstream.sources.raw import TableRows


def general(pipeline: Pipeline) -> Pipeline:
    """The same pipeline with its kernels switched off."""
    pipeline._raw_kernel = None
    pipeline._records_kernel = None
    return pipeline


def pipeline_of(app: ps.App) -> Pipeline:
    return Pipeline(app, "s", "0", build_sinks(app), {})


def as_lines(raw: list[bytes], start: int = 17) -> JsonLines:
    end = start + sum(len(x) + 1 for x in raw)
    return JsonLines(list(raw), start, end, end)


def summary(out: BatchOutput) -> Any:
    return (
        out.records_in,
        out.slots,
        [(d.offset, d.payload, d.error, d.operator) for d in out.dead],
    )


def random_value(rng: random.Random) -> Any:
    return rng.choice([1, 2, 3, 2**62, 2.5, -1, 0, None, "7", True, [1], {"a": 1}])


def random_events(rng: random.Random, n: int) -> list[Any]:
    events: list[Any] = []
    for i in range(n):
        e: dict[str, Any] = {"id": i, "user": rng.choice(["a", "b", "c", 1, None])}
        if rng.random() < 0.9:
            e["amount"] = rng.choice([rng.randint(1, 100), random_value(rng)])
        if rng.random() < 0.05:
            e["user"] = ["unhashable"]
        events.append(e)
    return events


def random_lines(rng: random.Random, n: int) -> list[bytes]:
    lines = [json.dumps(e).encode() for e in random_events(rng, n)]
    for _ in range(n // 20):
        bad = rng.choice([b"", b"   ", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe{}", b"42"])
        lines.insert(rng.randrange(len(lines) + 1), bad)
    return lines


def append_app() -> ps.App:
    app = ps.App("k")
    events = app.stream("s", ps.FileSource("unused.jsonl"))

    def to_row(e: dict[str, Any]) -> Any:
        if e["id"] % 13 == 5:
            return ["not", "a", "dict"]
        if e["id"] % 17 == 3:
            return {"other": e["id"]}  # a second column shape
        return {"id": e["id"], "cents": e["amount"] * 100}

    events.filter(lambda e: e["id"] % 7 != 0).map(to_row).to_table("facts")
    return app


def aggregate_app() -> ps.App:
    app = ps.App("k")
    events = app.stream("s", ps.FileSource("unused.jsonl"))
    events.filter(lambda e: e["id"] % 11 != 0).key_by("user").aggregate(
        n=ps.count(),
        present=ps.count("amount"),
        total=ps.sum("amount"),
        lo=ps.min("amount"),
        hi=ps.max("amount"),
        mean=ps.avg("amount"),
    ).to_table("totals")
    return app


def plain_sum_app() -> ps.App:
    app = ps.App("k")
    app.stream("s", ps.FileSource("unused.jsonl")).key_by("user").aggregate(
        n=ps.count(), total=ps.sum("amount")
    ).to_table("totals")
    return app


APPS = [append_app, aggregate_app, plain_sum_app]


@pytest.mark.parametrize("make_app", APPS)
@pytest.mark.parametrize("seed", range(6))
def test_raw_kernel_equals_general_loop(make_app: Any, seed: int) -> None:
    lines = random_lines(random.Random(seed), 400)
    if seed == 0:
        lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte-order mark on the very first line
        batch = as_lines(lines, start=0)
    else:
        batch = as_lines(lines)
    fast = pipeline_of(make_app())
    assert fast._raw_kernel is not None
    want = general(pipeline_of(make_app())).evaluate_raw(batch)
    assert summary(fast.evaluate_raw(batch)) == summary(want)


@pytest.mark.parametrize("make_app", APPS)
@pytest.mark.parametrize("seed", range(6))
def test_records_kernel_equals_general_loop(make_app: Any, seed: int) -> None:
    rng = random.Random(seed)
    records = [SourceRecord(10 + 3 * i, e) for i, e in enumerate(random_events(rng, 400))]
    for i in range(0, 400, 37):
        records[i] = SourceRecord(records[i].offset, None, b"raw", "could not decode")
    for rec in records[1::9]:
        if rec.value is not None and rec.value.get("amount") is not None:
            rec.value["amount"] = Decimal("1.5")  # table sources give numeric as Decimal
    fast = pipeline_of(make_app())
    assert fast._records_kernel is not None
    want = general(pipeline_of(make_app())).evaluate(records)
    assert summary(fast.evaluate(records)) == summary(want)


def test_no_kernel_for_flat_map_or_several_sinks() -> None:
    app = ps.App("k")
    events = app.stream("s", ps.FileSource("unused.jsonl"))
    events.flat_map(lambda e: [e, e]).to_table("facts")
    assert pipeline_of(app)._raw_kernel is None
    app2 = append_app()
    app2.sinks.append(aggregate_app().sinks[0])
    assert pipeline_of(app2)._raw_kernel is None


def test_a_failing_record_leaves_no_partial_accumulator() -> None:
    """sum fails on the second record after count could already have counted it."""
    fast = pipeline_of(plain_sum_app())
    good, bad = b'{"user": "a", "amount": 1}', b'{"user": "a", "amount": "x"}'
    out = fast.evaluate_raw(as_lines([good, bad]))
    assert out.slots == [{"a": [1, 1]}]
    assert [d.offset for d in out.dead] == [17 + len(good) + 1]


def test_pending_fold_state_is_seen_by_the_next_batch() -> None:
    """A batch evaluated while the previous one commits continues from its fold state."""
    from pgstream.state.store import KeyedState

    app = ps.App("k")
    app.stream("s", ps.FileSource("unused.jsonl")).key_by("k").fold(
        0, lambda n, r: n + 1, name="counter"
    ).to_table("counts")
    state = KeyedState("k", "counter", "0")
    pipeline = Pipeline(app, "s", "0", build_sinks(app), {"counter": state})
    first = pipeline.evaluate([SourceRecord(0, {"k": "x"}), SourceRecord(1, {"k": "x"})])
    second = pipeline.evaluate([SourceRecord(2, {"k": "x"})], pending=first)
    assert second.slots[0]['"x"'][1] == b"3"


@pytest.mark.parametrize("make_app", APPS)
def test_repeated_one_byte_lines_get_their_own_offsets(make_app: Any) -> None:
    """Bytes objects of length 0 and 1 are shared singletons: failures are still placed."""
    good = b'{"id": 1, "user": "a", "amount": 3}'
    batch = as_lines([b"1", good, b"1", b"", b"x", b"", b"1", good, b"x"])
    want = general(pipeline_of(make_app())).evaluate_raw(batch)
    assert summary(pipeline_of(make_app()).evaluate_raw(batch)) == summary(want)
    assert len(want.dead) == 5


def windowed_app() -> ps.App:
    app = ps.App("k")
    app.stream("s", ps.FileSource("unused.jsonl")).key_by("user").window(
        ps.tumbling(seconds=60), time="ts"
    ).aggregate(n=ps.count(), total=ps.sum("amount")).to_table("windows")
    return app


def table_rows(rng: random.Random, n: int, layout: tuple[str, ...]) -> TableRows:
    """Random events as a table read's tuples: ``layout`` names the record's fields; the
    offset column ``id`` comes last when it is no field."""
    rows = []
    for i, e in enumerate(random_events(rng, n)):
        e["id"] = 10 + 3 * i
        e["ts"] = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=7 * i)
        if i % 23 == 4:
            e["ts"] = "not a time"
        if i % 29 == 6:
            e["amount"] = Decimal("2.5")  # numeric columns come as Decimal
        values = tuple(e.get(name) for name in layout)
        rows.append(values if "id" in layout else (*values, e["id"]))
    offset_index = layout.index("id") if "id" in layout else len(layout)
    return TableRows(layout, rows, offset_index, 10, 10 + 3 * n)


LAYOUTS = [
    ("id", "user", "amount", "ts"),
    ("user", "amount", "ts"),  # the offset column read only for the offsets
    ("ts", "amount", "user", "id"),
    ("id", "user", "ts"),  # no "amount" column: reading it fails record by record
]


@pytest.mark.parametrize("make_app", [*APPS, windowed_app])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_table_rows_kernel_equals_general_loop(
    make_app: Any, layout: tuple[str, ...], seed: int
) -> None:
    """A table's tuples give what the general loop gives on the same rows as dicts (the
    field-only aggregate reads the tuples themselves), dead letters included."""
    batch = table_rows(random.Random(seed), 300, layout)
    fast = pipeline_of(make_app())
    assert fast._raw_kernel is not None
    want = general(pipeline_of(make_app())).evaluate(batch.records())
    got = fast.evaluate_raw(batch)
    assert summary(got) == summary(want)
    assert got.records_in == 300


def test_table_rows_records_and_offsets() -> None:
    batch = TableRows(("a", "b"), [(1, "x", 5), (2, "y", 9)], 2, 5, 10)
    assert [r.offset for r in batch.records()] == [5, 9]
    assert batch.records()[1].value == {"a": 2, "b": "y"}
    assert list(batch.offsets()) == [5, 9] and batch.offset(1) == 9
    batch.extend(TableRows(("a", "b"), [(3, "z", 12)], 2, 10, 13))
    assert len(batch) == 3 and batch.end == 13
    with pytest.raises(ValueError, match="do not continue"):
        batch.extend(TableRows(("a", "b"), [], 2, 99, 99))
    with pytest.raises(ValueError, match="other columns"):
        batch.extend(TableRows(("a",), [(1, 20)], 1, 13, 21))


def test_pipeline_fields_only_when_no_python_function_sees_the_records() -> None:
    assert pipeline_of(plain_sum_app()).fields == frozenset({"user", "amount"})
    assert pipeline_of(windowed_app()).fields == frozenset({"user", "amount", "ts"})
    assert pipeline_of(aggregate_app()).fields is None  # a filter runs first
    assert pipeline_of(append_app()).fields is None
    app = ps.App("k")
    app.stream("s", ps.FileSource("unused.jsonl")).key_by(lambda e: e["u"], name="u").aggregate(
        n=ps.count()
    ).to_table("t")
    assert pipeline_of(app).fields is None


def shapes_app() -> ps.App:
    """Outputs whose keys change from record to record: the same keys in another order, one
    key, more keys, no key, a key the previous shape lacked."""
    app = ps.App("k")

    def to_row(e: dict[str, Any]) -> dict[str, Any]:
        i = e["id"]
        shape = i % 7
        if shape == 1:
            return {"b": i, "a": -i}  # the same columns, reordered
        if shape == 2:
            return {"a": -i}
        if shape == 3:
            return {"a": -i, "b": i, "c": "x"}
        if shape == 4:
            return {}
        if shape == 5:
            return {"a": -i, "c": "y"}  # as wide as (a, b), another column
        return {"a": -i, "b": i}

    app.stream("s", ps.FileSource("unused.jsonl")).map(to_row).to_table("facts")
    return app


def by_position(out: BatchOutput) -> dict[Any, dict[str, Any]]:
    """Every output row as its columns' values, by its position (what the table holds)."""
    rows: dict[Any, dict[str, Any]] = {}
    for cols, group in out.slots[0].items():
        for row in group:
            rows[row[len(cols) :]] = dict(zip(cols, row[: len(cols)], strict=True))
    return rows


@pytest.mark.parametrize("order", ["runs", "shuffled"])
def test_append_kernel_rows_for_changing_shapes(order: str) -> None:
    """Whatever the output dicts' keys and their order, every row holds the same values
    under the same columns as the general loop's, at the same position; an output with the
    previous output's keys in another order joins its group (one COPY)."""
    ids = list(range(700))
    if order == "runs":
        ids.sort(key=lambda i: (i % 7, i))
    else:
        random.Random(3).shuffle(ids)
    records = [SourceRecord(100 + pos, {"id": i}) for pos, i in enumerate(ids)]
    batch = TableRows(("id",), [(i, 100 + pos) for pos, i in enumerate(ids)], 1, 100, 800)
    want = general(pipeline_of(shapes_app())).evaluate(records)
    for got in (
        pipeline_of(shapes_app()).evaluate(records),
        pipeline_of(shapes_app()).evaluate_raw(batch),
    ):
        assert by_position(got) == by_position(want)
        assert len(by_position(got)) == 700
        if order == "runs":  # the reordered (b, a) outputs follow the (a, b) ones: one group
            assert ("a", "b") in got.slots[0] and ("b", "a") not in got.slots[0]

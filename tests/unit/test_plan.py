"""The recorded plan: describe, fingerprint and diff, without a database."""

from __future__ import annotations

from typing import Any

import orjson

import pgstream as ps
from pgstream import plan as plans


def build(
    *,
    factor: int = 100,
    stream: str = "orders",
    window: float = 60,
    extra_sink: bool = False,
    path: str = "/data/orders.jsonl",
) -> ps.App:
    app = ps.App("shop")
    orders = app.stream(stream, ps.FileSource(path))
    if factor == 100:
        orders.map(lambda o: {"cents": o["amount"] * 100}).to_table("facts")
    else:
        orders.map(lambda o: {"cents": o["amount"] * 1000}).to_table("facts")
    orders.key_by("user_id").window(ps.tumbling(seconds=window), time="ts").aggregate(
        n=ps.count()
    ).to_table("user_minute")
    orders.key_by("user_id").fold(0, lambda s, o: s + 1).to_table("counts")
    if extra_sink:
        orders.key_by("user_id").aggregate(total=ps.sum("amount")).to_table("totals")
    return app


def test_the_same_app_twice_has_the_same_fingerprint() -> None:
    first, second = plans.describe(build()), plans.describe(build())
    assert first == second
    assert plans.fingerprint(first) == plans.fingerprint(second)
    # the plan survives a JSON round trip unchanged (it is stored as JSONB)
    assert orjson.loads(orjson.dumps(first)) == first


def test_plan_follows_the_contract() -> None:
    plan = plans.describe(build())
    assert plan["streams"] == {"orders": {"source": "file /data/orders.jsonl"}}
    assert [(s["stream"], s["table"], s["kind"]) for s in plan["sinks"]] == [
        ("orders", "facts", "append"),
        ("orders", "user_minute", "aggregate"),
        ("orders", "counts", "fold"),
    ]
    assert plan["sinks"][2]["operator"] == "orders:fold:counts"
    assert plan["sinks"][1]["key"]["window"] == {"tumbling_seconds": 60.0, "time": "ts"}


def test_a_changed_lambda_changes_the_fingerprint_and_is_named() -> None:
    old, new = plans.describe(build()), plans.describe(build(factor=1000))
    assert plans.fingerprint(old) != plans.fingerprint(new)
    (change,) = plans.diff(old, new)
    assert change.kind == "code-changed" and change.table == "facts"
    assert change.text() == (
        "the map/filter/flat_map code feeding facts changed: rows already written keep the old "
        "logic"
    )


def test_a_changed_window_is_a_key_change() -> None:
    (change,) = plans.diff(plans.describe(build()), plans.describe(build(window=30)))
    assert change.kind == "key-changed" and change.table == "user_minute"
    assert "aggregates are inconsistent" in change.consequence


def test_added_sink_renamed_and_removed_streams() -> None:
    old = plans.describe(build())
    (added,) = plans.diff(old, plans.describe(build(extra_sink=True)))
    assert added.text() == (
        "new sink totals (aggregate from stream 'orders'): starts empty: it gets only records "
        "after this point, not history"
    )
    (renamed,) = plans.diff(old, plans.describe(build(stream="orders_v2")), target="app:app")
    assert renamed.kind == "stream-renamed"
    assert "run `pgstream job rename app:app --stream orders=orders_v2` first" in renamed.text()
    moved = plans.diff(old, plans.describe(build(stream="other", path="/data/other.jsonl")))
    assert {c.kind for c in moved} == {"stream-removed", "stream-added", "sink-removed",
                                      "sink-added"}
    removed = next(c for c in moved if c.kind == "stream-removed")
    assert "retire it with `pgstream job retire MODULE:APP --stream orders`" in removed.text()
    source = plans.diff(old, plans.describe(build(path="/data/new.jsonl")))
    assert [c.kind for c in source] == ["source-changed"]


def test_sink_status_per_version() -> None:
    old = plans.describe(build())
    status = plans.sink_status(old, plans.describe(build(factor=1000, extra_sink=True)))
    assert status == {
        "orders->facts": "changed",
        "orders->user_minute": "same",
        "orders->counts": "same",
        "orders->totals": "absent",
    }


def test_code_fingerprints_with_and_without_source() -> None:
    namespace: dict[str, Any] = {}
    exec("f = lambda x: x + 1\ng = lambda x: x + 2\nh = lambda x: x + 1", namespace)
    f, g, h = namespace["f"], namespace["g"], namespace["h"]
    assert plans.code_fingerprint(f).startswith("code:")  # no source file: the code object
    assert plans.code_fingerprint(f) == plans.code_fingerprint(h)
    assert plans.code_fingerprint(f) != plans.code_fingerprint(g)

    def make(threshold: int) -> Any:
        return lambda x: x > threshold

    # documented limit: a value captured by a closure is not part of the fingerprint
    assert plans.code_fingerprint(make(1)) == plans.code_fingerprint(make(2))
    assert plans.code_fingerprint(make).startswith("src:")

"""Operators in isolation: chains, keys, aggregate accumulation, folds."""

from __future__ import annotations

import enum
import uuid
from collections import defaultdict
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.operators.fold import Fold, FoldStateError
from pgstream.operators.keys import KeySpec
from pgstream.operators.steps import Filter, FlatMap, Map, compile_chain


def test_chain_without_flat_map_composes_map_and_filter() -> None:
    run = compile_chain([Filter(lambda r: r > 0), Map(lambda r: r * 2), Filter(lambda r: r != 4)])
    assert run(3) == [6]
    assert run(-1) == []
    assert run(2) == []


def test_chain_with_flat_map_fans_out_in_order() -> None:
    run = compile_chain(
        [Map(lambda r: r + 1), FlatMap(lambda r: range(r)), Filter(lambda r: r % 2 == 0)]
    )
    assert run(4) == [0, 2, 4]
    assert run(-5) == []


def test_empty_chain_is_identity() -> None:
    assert compile_chain([])({"a": 1}) == [{"a": 1}]


def test_key_specs() -> None:
    assert KeySpec.build("user").fn({"user": "u1"}) == "u1"
    assert KeySpec.build("user").columns == ("user",)
    two = KeySpec.build(["a", "b"])
    assert two.fn({"a": 1, "b": 2}) == (1, 2) and two.values((1, 2)) == (1, 2)
    computed = KeySpec.build(lambda r: r["x"] % 3, name="bucket")
    assert computed.columns == ("bucket",) and computed.values(2) == (2,)
    with pytest.raises(ConfigError, match="name"):
        KeySpec.build(lambda r: r)


@pytest.mark.parametrize(
    ("agg", "values", "expected"),
    [
        (ps.count(), [1, None, 3], (3,)),
        (ps.count("x"), [1, None, 3], (2,)),
        (ps.sum("x"), [1, None, 2.5], (3.5,)),
        (ps.sum("x"), [None, None], (None,)),
        (ps.min("x"), [5, None, 2, 9], (2,)),
        (ps.max("x"), ["b", "a", "c"], ("c",)),
        (ps.avg("x"), [1, 2, None, 6], (3.0, 9, 3)),
        (ps.sum("x"), [Decimal("1.1"), Decimal("2.2")], (Decimal("3.3"),)),
    ],
)
def test_aggregate_accumulation(agg: ps.Aggregate, values: list[Any], expected: tuple[Any]) -> None:
    agg = agg.named("c")
    acc = agg.start(values[0])
    for v in values[1:]:
        acc = agg.add(acc, v)
    assert agg.outputs(acc) == expected


def test_sum_rejects_non_numbers_without_changing_the_accumulator() -> None:
    agg = ps.sum("x").named("total")
    with pytest.raises(TypeError, match="needs numbers"):
        agg.start("12")
    assert agg.add(10, 5) == 15
    with pytest.raises(TypeError, match="needs numbers"):
        agg.add(10, "5")


def test_avg_sink_columns() -> None:
    assert ps.avg("x").named("mean").columns() == ("mean", "_mean_sum", "_mean_count")
    with pytest.raises(ConfigError):
        ps.sum(None)  # type: ignore[arg-type]


def test_fold_steps_on_private_copies() -> None:
    def bump(state: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
        state["n"] += 1
        if rec.get("boom"):
            raise ValueError("boom")
        return state

    fold = Fold({"n": 0}, bump)
    blob = fold.step(None, {})
    blob = fold.step(blob, {})
    with pytest.raises(ValueError):
        fold.step(blob, {"boom": True})
    assert fold.output(blob) == (("n",), (2,))
    assert fold.new_state() == {"n": 0}  # the initial value was never mutated
    assert Fold(0, lambda s, r: s + r).output(Fold(0, lambda s, r: s + r).step(None, 5)) == (
        ("value",),
        (5,),
    )


class _Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(
    ("state", "problem", "advice"),
    [
        ({"last_seen": datetime(2026, 1, 1)}, "state['last_seen'] is a datetime", "isoformat()"),
        ({"d": date(2026, 1, 1)}, "state['d'] is a date", "isoformat()"),
        ({"amount": Decimal("1.5")}, "state['amount'] is a Decimal", "str(amount)"),
        ({"pair": (1, 2)}, "state['pair'] is a tuple", "a list"),
        ((1, 2), "state is a tuple", "a list"),
        ({"tags": {"a"}}, "state['tags'] is a set", "sorted list"),
        ({"by_id": {1: "x"}}, "state['by_id'] has the key 1 of type int", "str keys"),
        ({"avg": float("nan")}, "state['avg'] is nan, which JSON cannot hold", "None"),
        ({"xs": [1.0, float("inf")]}, "state['xs'][1] is inf", "None"),
        ({"raw": b"\x00"}, "state['raw'] is a bytes", "hex()"),
        ({"id": uuid.UUID(int=1)}, "state['id'] is a UUID", "str(value)"),
        ({"c": _Color.RED}, "state['c'] is a _Color", ".value"),
        ({"o": object()}, "state['o'] is an object", "only dicts with str keys"),
        (defaultdict(int), "state is a defaultdict (a subclass of dict)", "dict(value)"),
        ({"deep": [{"at": datetime(2026, 1, 1)}]}, "state['deep'][0]['at'] is a datetime", ""),
        ({"big": 2**70}, "Integer exceeds 64-bit range", ""),
    ],
)
def test_fold_state_must_survive_json(state: Any, problem: str, advice: str) -> None:
    fold = Fold(None, lambda s, r: state)
    with pytest.raises(FoldStateError) as info:
        fold.step(None, {}, 42)
    text = str(info.value)
    assert text.startswith(f"fold state is not plain JSON: {problem}"), text
    assert "(returned by the fold on key 42)" in text and advice in text


def test_fold_gets_back_exactly_what_it_returned() -> None:
    seen: list[Any] = []
    plain = {"n": 1, "x": 2.5, "s": "é", "none": None, "ok": True, "l": [1, [2.0], {"a": "b"}]}

    def step(state: Any, rec: Any) -> Any:
        seen.append(state)
        return plain

    fold = Fold({"n": 0}, step)
    blob = fold.step(fold.step(None, {}), {})
    assert seen == [{"n": 0}, plain] and fold.output(blob)[0] == tuple(plain)
    assert Fold(0, lambda s, r: s + 1).step(b"41", {}) == b"42"


def test_fold_initial_must_be_plain_json() -> None:
    with pytest.raises(ConfigError, match=r"initial\['since'\] is a datetime") as info:
        Fold({"since": datetime(2026, 1, 1)}, lambda s, r: s)
    assert info.value.hint is not None and "isoformat()" in info.value.hint
    with pytest.raises(ConfigError, match="initial is a tuple"):
        ps.App("x").stream("a", ps.FileSource("/dev/null")).key_by("k").fold((0, 0), max)
    factory = Fold(lambda: {"since": datetime(2026, 1, 1)}, lambda s, r: s)
    with pytest.raises(FoldStateError, match=r"returned by initial\(\) on key 'k'"):
        factory.step(None, {}, "k")


def test_app_rejects_bad_definitions() -> None:
    app = ps.App("x")
    src = ps.FileSource("/dev/null")
    s = app.stream("a", src)
    with pytest.raises(ConfigError, match="twice"):
        app.stream("a", src)
    with pytest.raises(ConfigError):
        s.key_by("k").aggregate()
    with pytest.raises(ConfigError):
        s.key_by("k").aggregate(n=42)  # type: ignore[arg-type]
    s.key_by("k").aggregate(n=ps.count()).to_table("t")
    with pytest.raises(ConfigError, match=r"an append sink .* and an aggregate sink"):
        s.to_table("t")
    with pytest.raises(ConfigError):
        ps.App("")
    with pytest.raises(ConfigError, match="on_error"):
        ps.App("y", on_error="ignore")  # type: ignore[arg-type]

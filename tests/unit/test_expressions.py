"""Column expressions compiled to Python: SQL's NULL, division and logic rules."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

import pgstream as ps
from pgstream import plan
from pgstream.errors import ConfigError
from pgstream.operators.steps import Map


def run(expr: ps.Expr, **record: object) -> object:
    return expr.compile()(record)


def keeps(expr: ps.Expr, **record: object) -> bool:
    return expr.compile_predicate()(record)


def test_arithmetic_propagates_null() -> None:
    e = ps.col("a") * 100 + ps.col("b")
    assert run(e, a=2, b=1) == 201
    assert run(e, a=None, b=1) is None
    assert run(e, a=2, b=None) is None
    assert run(1 - ps.col("a"), a=Decimal("0.25")) == Decimal("0.75")
    assert run(-ps.col("a"), a=3) == -3


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(7, 2, 3), (-7, 2, -3), (7, -2, -3), (-7, -2, 3), (6, 3, 2), (7.0, 2, 3.5), (1, 4.0, 0.25)],
)
def test_division_truncates_integers_toward_zero(a: object, b: object, expected: object) -> None:
    assert run(ps.col("a") / ps.col("b"), a=a, b=b) == expected


def test_division_by_zero_raises() -> None:
    with pytest.raises(ZeroDivisionError):
        run(ps.col("a") / 0, a=1)


def test_division_by_zero_beside_a_null_raises_as_in_sql() -> None:
    # PostgreSQL evaluates both operands of an operator before it looks for NULL: the
    # Python rendering must not skip the right side because the left one is NULL
    with pytest.raises(ZeroDivisionError):
        run(ps.col("d") > ps.col("a") / ps.col("a"), d=None, a=0)
    with pytest.raises(ZeroDivisionError):
        run(ps.col("d") + 1 / ps.col("a"), d=None, a=0)


def test_comparisons_with_null_are_null_and_filter_drops_them() -> None:
    assert run(ps.col("a") > 1, a=None) is None
    assert not keeps(ps.col("a") > 1, a=None)
    assert not keeps(ps.col("a") != 1, a=None)
    assert keeps(ps.col("a") != 1, a=2)
    assert keeps(ps.col("a") == "x", a="x")


def test_three_valued_logic() -> None:
    t, f, n = ps.lit(True), ps.lit(False), ps.col("n")
    rec = {"n": None}
    assert (n & f).compile()(rec) is False
    assert (n & t).compile()(rec) is None
    assert (n | t).compile()(rec) is True
    assert (n | f).compile()(rec) is None
    assert (~n).compile()(rec) is None
    assert (~(n | t)).compile()(rec) is False
    assert keeps(n.is_null(), n=None) and not keeps(n.is_not_null(), n=None)


def test_functions() -> None:
    assert run(ps.col("s").lower(), s="ÀbC") == "àbc"
    assert run(ps.col("s").upper(), s="straße") == "STRAßE"  # one character each, like SQL
    assert run(ps.col("s").upper(), s=None) is None
    assert run(ps.coalesce(ps.col("a"), ps.col("b"), 0), a=None, b=None) == 0
    assert run(ps.coalesce(ps.col("a"), ps.col("b"), 0), a=None, b=5) == 5
    assert keeps(ps.col("a").is_in([1, 2]), a=2) and not keeps(ps.col("a").is_in([1]), a=None)


def test_bucket_floors_to_epoch_aligned_buckets() -> None:
    utc = timezone.utc
    e = ps.col("ts").bucket(seconds=60)
    assert run(e, ts=datetime(2024, 5, 1, 12, 3, 59, 999999, tzinfo=utc)) == datetime(
        2024, 5, 1, 12, 3, tzinfo=utc
    )
    assert run(e, ts=datetime(2024, 5, 1, 12, 3, 5)) == datetime(2024, 5, 1, 12, 3)
    assert run(e, ts=None) is None
    with pytest.raises(ConfigError):
        ps.col("ts").bucket(seconds=0)


def test_misuse_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="truth value"):
        bool(ps.col("a") > 1)
    with pytest.raises(ConfigError, match="lit"):
        ps.lit(object())
    with pytest.raises(ConfigError, match="is_in"):
        ps.col("a").is_in([None])
    with pytest.raises(ConfigError, match="None is always NULL") as info:
        ps.col("a") == None  # noqa: B015, E711
    assert info.value.hint == "use .is_null()"


def test_select_and_key_by_compile_once() -> None:
    app = ps.App("x")
    s = app.stream("s", ps.FileSource("/dev/null"))
    s.filter(ps.col("a") > 0).select(a=ps.col("a"), b2=ps.col("b") * 2).to_table("out")
    s.key_by(ps.col("a") / 10, name="bucket").aggregate(n=ps.count()).to_table("agg")
    select = app.sinks[0].steps[1]
    assert isinstance(select, Map)
    assert select.fn({"a": 1, "b": 3}) == {"a": 1, "b2": 6}
    key = app.sinks[1].key
    assert key is not None and key.columns == ("bucket",) and key.fn({"a": 25}) == 2
    with pytest.raises(ConfigError, match="name"):
        s.key_by(ps.col("a") + 1)


def test_expressions_are_part_of_the_plan() -> None:
    def app_with(threshold: int) -> ps.App:
        app = ps.App("x")
        s = app.stream("s", ps.FileSource("/dev/null"))
        s.filter(ps.col("a") > threshold).key_by("k").aggregate(t=ps.sum(ps.col("a") * 2)) \
            .to_table("agg")
        return app

    one, two = plan.describe(app_with(1)), plan.describe(app_with(2))
    assert plan.fingerprint(one) == plan.fingerprint(plan.describe(app_with(1)))
    assert plan.fingerprint(one) != plan.fingerprint(two)
    sink = one["sinks"][0]
    assert sink["steps"][0] == {"op": "filter", "expr": "(col('a') > lit(1))"}
    assert sink["aggregates"][0]["field"] == {"expr": "(col('a') * lit(2))"}

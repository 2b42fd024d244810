"""One definition per rule: an aggregate's delta merge agrees with folding every value at
once, and composed steps are what both the general loop and the kernels run."""

from __future__ import annotations

import random
from functools import reduce
from typing import Any

import pytest

import pgstream as ps
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.steps import (
    SKIP,
    Filter,
    FlatMap,
    Map,
    Step,
    compile_chain,
    compose,
    identity,
)

AGGREGATES = [ps.count(), ps.count("x"), ps.sum("x"), ps.min("x"), ps.max("x"), ps.avg("x")]


def fold(agg: Aggregate, values: list[Any]) -> Any:
    return reduce(agg.add, values, agg.empty())


@pytest.mark.parametrize("agg", AGGREGATES, ids=lambda a: f"{a.kind}({a.field})")
@pytest.mark.parametrize("seed", range(5))
def test_merging_two_deltas_equals_one_delta_of_all_values(agg: Aggregate, seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.choice([None, rng.randint(-50, 50), rng.random()]) for _ in range(30)]
    cut = rng.randrange(len(values) + 1)
    merged = agg.merge(fold(agg, values[:cut]), fold(agg, values[cut:]))
    want = fold(agg, values)
    if agg.kind == "avg":  # (total, count)
        assert merged[1] == want[1]
        assert merged[0] == pytest.approx(want[0])
    else:
        assert merged == pytest.approx(want)


@pytest.mark.parametrize("agg", AGGREGATES, ids=lambda a: f"{a.kind}({a.field})")
def test_start_is_adding_to_the_empty_accumulator(agg: Aggregate) -> None:
    for value in (None, 0, 7, 2.5):
        assert agg.start(value) == agg.add(agg.empty(), value)


def test_kernel_code_evaluates_like_start_and_add() -> None:
    for agg in AGGREGATES:
        first, then = agg.kernel_code("A", "x", "acc")
        for x in (3, 2.5, None):
            acc = agg.start(5)
            env = {"A": agg, "x": x, "acc": acc}
            if agg.kind == "count" and agg.field is None:
                env["x"] = None
            assert eval(first, env) == agg.start(env["x"])  # our own template
            assert eval(then, env) == agg.add(acc, env["x"])


def test_compose_is_the_one_step_composition() -> None:
    steps: list[Step] = [Filter(lambda r: r > 0), Map(lambda r: r * 2), Filter(lambda r: r != 4)]
    fn = compose(steps)
    assert fn is not None
    assert [fn(r) for r in (-1, 2, 3)] == [SKIP, SKIP, 6]
    assert compose([]) is identity
    assert compose([Map(str), FlatMap(lambda r: [r])]) is None
    assert compile_chain(steps)(3) == [6] and compile_chain(steps)(2) == []

"""Which streams ``pgstream rewind`` can retract exactly, and the error naming what it cannot."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.rewind import _negate, check_retractable


def _app(
    extra: Callable[[ps.App, ps.Stream], None] | None = None, path: str = "/tmp/s.jsonl"
) -> ps.App:
    app = ps.App("r")
    s = app.stream("s", ps.FileSource(path))
    s.map(lambda r: r).to_table("facts")
    keyed = s.key_by("k")
    keyed.aggregate(n=ps.count(), total=ps.sum("v"), mean=ps.avg("v")).to_table("totals")
    keyed.window(ps.tumbling(seconds=60), time="ts").aggregate(n=ps.count()).to_table("per_min")
    if extra is not None:
        extra(app, s)
    return app


def test_append_count_sum_avg_and_plain_windows_are_retractable() -> None:
    check_retractable(_app(), "s")


def _repartitioned(app: ps.App, s: ps.Stream) -> None:
    s.key_by("k").fold(0, lambda n, r: n + 1, partitions=4).to_table("spread")


def test_a_repartitioned_fold_is_refused() -> None:
    with pytest.raises(ConfigError, match="sink 'spread' is fed through a repartition table"):
        check_retractable(_app(_repartitioned, "/tmp/s/*.jsonl"), "s")


def _handler(app: ps.App, s: ps.Stream) -> None:
    @app.batch(s)
    def outbox(batch: ps.Batch) -> None:
        pass


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            lambda a, s: s.key_by("k").aggregate(lo=ps.min("v")).to_table("lows"),
            "aggregate sink 'lows' has min",
        ),
        (
            lambda a, s: s.key_by("k").fold(0, lambda n, r: n + 1).to_table("folds"),
            "fold sink 'folds'",
        ),
        (
            lambda a, s: (
                s.key_by("k")
                .window(ps.tumbling(seconds=60), time="ts", grace=5)
                .aggregate(n=ps.count())
                .to_table("graced")
            ),
            "aggregate sink 'graced' has a window with grace",
        ),
        (
            lambda a, s: s.lookup("public.users", on={"k": "id"}, columns=["c"]).to_table("enr"),
            "sink 'enr' enriches records with a lookup",
        ),
        (_handler, "@app.batch handler 'outbox'"),
    ],
)
def test_refusals_name_the_sink_and_the_way_out(
    extra: Callable[[ps.App, ps.Stream], None], named: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_retractable(_app(extra), "s")
    assert named in str(err.value)
    assert err.value.hint is not None and "pgstream rebuild MODULE:APP" in err.value.hint
    assert "job reset" in err.value.hint


def test_other_streams_are_not_refused_for_this_one() -> None:
    def fold_elsewhere(app: ps.App, s: ps.Stream) -> None:
        other = app.stream("t", ps.FileSource("/tmp/t.jsonl"))
        other.key_by("k").fold(0, lambda n, r: n + 1).to_table("folds")

    check_retractable(_app(fold_elsewhere), "s")


def test_negated_deltas_cancel_the_merge() -> None:
    assert _negate("count", 3) == -3
    assert _negate("sum", None) is None and _negate("sum", 2.5) == -2.5
    assert _negate("avg", (10, 4)) == (-10, -4) and _negate("avg", (None, 0)) == (None, 0)

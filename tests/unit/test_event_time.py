"""Event time and windows: the clock, the watermarks and the tumbling assigner, each alone,
and the windowed key they compose (unchanged behaviour and plan fingerprints)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import pgstream as ps
from pgstream import plan as plans
from pgstream.operators.eventtime import EventClock, Watermarks, event_time
from pgstream.operators.keys import KeySpec
from pgstream.operators.windows import TumblingAssigner, tumbling, windowed_key

UTC = timezone.utc


def _ts_of(record: Any) -> Any:
    return record["at"]["ts"]


def windowed_app() -> ps.App:
    app = ps.App("shop")
    orders = app.stream("orders", ps.FileSource("/data/orders.jsonl"))
    orders.key_by("user_id").window(ps.tumbling(seconds=60), time="ts").aggregate(
        n=ps.count(), total=ps.sum("amount")
    ).to_table("user_minute")
    orders.key_by(["user_id", "shop"]).window(ps.tumbling(minutes=5), time=_ts_of).aggregate(
        n=ps.count()
    ).to_table("shop_five")
    return app


#: computed with the code before event time got its own clock (commit 54dd968)
FINGERPRINT_BEFORE = "a291e8031128b6f2b2264eca7dd7cc0b59005ef691e03c72d667e46889f4b4e5"


def test_windowed_plan_fingerprint_is_unchanged() -> None:
    assert plans.fingerprint(plans.describe(windowed_app())) == FINGERPRINT_BEFORE


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0, 30),  # naive: taken as UTC
        "2024-05-01T12:00:30Z",
        "2024-05-01T14:00:30+02:00",
        1714564830,
        1714564830.0,
    ],
)
def test_the_clock_reads_each_kind_of_time(value: Any) -> None:
    clock = EventClock("ts")
    assert clock.epoch_of({"ts": value}) == 1714564830.0
    assert EventClock(lambda r: r["nested"]).epoch_of({"nested": value}) == 1714564830.0


@pytest.mark.parametrize("value", [True, None, [1]])
def test_the_clock_refuses_what_is_no_time(value: Any) -> None:
    with pytest.raises(TypeError, match="event time must be"):
        EventClock("ts").epoch_of({"ts": value})
    with pytest.raises(TypeError):
        event_time(value)


def test_watermarks_are_the_largest_time_per_partition_and_never_move_back() -> None:
    marks = EventClock("ts").watermarks()
    assert marks.of("0") is None
    assert marks.advance("0", 100.0) == 100.0
    assert marks.advance("0", 40.0) == 100.0  # a late record does not move it back
    assert marks.advance("1", 70.0) == 70.0
    assert marks.advance("0", 130.0) == 130.0
    assert (marks.of("0"), marks.of("1")) == (130.0, 70.0)
    assert marks.overall(["0", "1"]) == 70.0
    assert marks.overall(["0", "1", "2"]) is None  # partition 2 has seen nothing yet
    assert Watermarks().overall([]) is None


def test_the_tumbling_assigner_places_times_in_epoch_aligned_windows() -> None:
    assigner = tumbling(minutes=1).assigner()
    assert isinstance(assigner, TumblingAssigner) and assigner.step == 60.0
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert assigner.start(start.timestamp()) == start
    assert assigner.start(start.timestamp() + 59.999) == start
    assert assigner.start(start.timestamp() + 60) == start + timedelta(minutes=1)
    assert assigner.start(start.timestamp() - 0.001) == start - timedelta(minutes=1)
    assert assigner.starts(start.timestamp() + 1) == (start,)
    # one datetime per window, not per record
    assert assigner.start(start.timestamp() + 1) is assigner.start(start.timestamp() + 2)


def test_windowed_key_composes_the_key_the_clock_and_the_assigner() -> None:
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    one = windowed_key(KeySpec.build("user_id"), tumbling(seconds=60), EventClock("ts"))
    assert one.columns == ("user_id", "window_start")
    assert one.fn({"user_id": 7, "ts": "2024-05-01T12:00:42Z"}) == (7, start)
    assert one.by == ("user_id",) and one.window == (60.0, "ts")
    two = windowed_key(KeySpec.build(["a", "b"]), tumbling(seconds=60), EventClock(_ts_of))
    assert two.columns == ("a", "b", "window_start")
    assert two.fn({"a": 1, "b": 2, "at": {"ts": start.timestamp() + 5}}) == (1, 2, start)
    assert two.window == (60.0, _ts_of)

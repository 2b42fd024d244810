"""Session rules alone (:mod:`pgstream.operators.sessions`): records folded one by one with
:class:`SessionRules` (forgetting closed sessions as the plan does) give the sessions, ends and
late records of the offline reference of tests/windowref.py (which never forgets), on shuffled
input whose sessions split and merge; merged accumulators are exact for every aggregate; the
plan description names the gap; pushdown refuses sessions."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from windowref import session_reference

import pgstream as ps
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.sessions import Run, Runs, SessionRules
from pgstream.plan import describe
from pgstream.runtime.pushdown import NotPushable, analyze

T0 = 1_700_000_000.0


def _lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = T0 + i * 1.5 - (rng.random() * 25 if rng.random() < 0.4 else 0)
        if rng.random() < 0.03:
            t -= 300
        out.append(json.dumps({"user": f"u{rng.randrange(3)}", "v": rng.randrange(10), "ts": t}))
    return out


def _fold(lines: list[str], rules: SessionRules) -> tuple[dict[Any, Any], set[Any]]:
    """Every session the rules ever emit or keep (by user, start), and the late records."""
    wm: float | None = None
    runs: dict[str, Runs] = {}
    late: set[tuple[str, int, float]] = set()
    rows: dict[tuple[str, float], tuple[int, int, float]] = {}
    for offset, line in enumerate(lines):
        rec = json.loads(line)
        t, user = rec["ts"], rec["user"]
        mine = runs.get(user, ())
        closed = rules.late(mine, t, wm)
        if closed is not None:
            late.add(("0", offset, closed[0]))
            continue
        after = rules.add(mine, t, [None, rec["v"]])
        for r in mine:
            if r not in after:
                rows.pop((user, r.start), None)
        for r in after:
            if r.accs is not None:
                rows[(user, r.start)] = (r.accs[0], r.accs[1], rules.end(r))
        wm = t if wm is None or t > wm else wm
        for u in [*runs, user]:
            runs[u] = rules.expire(after if u == user else runs[u], wm)[0]
    return rows, late


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rules_give_the_reference_sessions_and_late_records(seed: int) -> None:
    lines = _lines(600, seed)
    rules = SessionRules(5.0, 10.0, (ps.count(), ps.sum("v")))
    rows, late = _fold(lines, rules)
    ref = session_reference({"0": list(enumerate(lines))}, gap=5.0, grace=10.0)
    assert ref.late and len(ref.windows) > 20
    assert {k: v[:2] for k, v in rows.items()} == ref.windows
    assert {k: v[2] for k, v in rows.items()} == ref.ends
    assert late == ref.late


def _aggs() -> tuple[Aggregate, ...]:
    return tuple(
        a.named(n)
        for n, a in (("n", ps.count()), ("s", ps.sum("v")), ("lo", ps.min("v")),
                     ("hi", ps.max("v")), ("m", ps.avg("v")))
    )


def test_a_bridging_record_merges_sessions_and_their_accumulators_exactly() -> None:
    rules = SessionRules(10.0, 0.0, _aggs())
    runs: Runs = ()
    for t, v in ((105.0, 5), (130.0, 1), (131.0, 9)):
        runs = rules.add(runs, t, [None, v, v, v, v])
    assert [(r.start, r.last) for r in runs] == [(105.0, 105.0), (130.0, 131.0)]
    runs = rules.add(runs, 121.0, [None, 3, 3, 3, 3])  # moves the second one's start
    assert [(r.start, r.last) for r in runs] == [(105.0, 105.0), (121.0, 131.0)]
    assert rules.add(runs, 115.0, [None, 0, 0, 0, 0])[1].start == 115.0  # 115 - 105 = gap
    runs = rules.add(runs, 112.0, [None, 2, 2, 2, 2])  # bridges 105 and 121..131
    assert len(runs) == 1 and (runs[0].start, runs[0].last) == (105.0, 131.0)
    assert runs[0].accs == (5, 20, 1, 9, (20, 5))
    assert rules.end(runs[0]) == 141.0
    again = Run.from_json(json.loads(json.dumps(runs[0].to_json())))
    assert again.accs is not None and list(again.accs) == [5, 20, 1, 9, [20, 5]]


def test_closed_sessions_turn_late_then_are_forgotten() -> None:
    rules = SessionRules(10.0, 5.0, (ps.count(),))
    runs = rules.add((), 100.0, [None])
    assert rules.late(runs, 105.0, 115.0) is None  # 110 + 5 < 115 is false: still open
    kept, closing = rules.expire(runs, 116.0)
    assert closing == [runs[0]] and kept == (Run(100.0, 100.0, None),)
    assert rules.late(kept, 105.0, 116.0) == (100.0, 110.0)  # would join the closed session
    assert rules.late(kept, 101.0, 117.0) == (101.0, 111.0)  # its own session is closed
    assert rules.expire(kept, 126.0)[0] == ()  # 100 + 20 + 5 < 126: nothing can join it


def test_the_plan_names_the_gap_and_pushdown_refuses_sessions() -> None:
    app = ps.App("s")
    table = ps.TableSource("public.events")
    s = app.stream("clicks", table)
    s.key_by("user").window(ps.session(gap=30), time="ts").aggregate(n=ps.count()).to_table("t")
    window = describe(app)["sinks"][0]["key"]["window"]
    assert window["session_gap"] == 30 and "tumbling_seconds" not in window
    with pytest.raises(NotPushable, match="session windows"):
        analyze(app.sinks[0], table)


def test_decimal_and_datetime_accumulators_come_back_from_the_state() -> None:
    from datetime import datetime, timezone
    from decimal import Decimal

    import orjson

    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    run = Run(1.5, 2.5, (3, Decimal("1.10"), when, (Decimal("2.5"), 2)))
    back = Run.from_json(orjson.loads(orjson.dumps(run.to_json())))
    assert back.accs == (3, Decimal("1.10"), when, [Decimal("2.5"), 2])

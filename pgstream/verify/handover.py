"""Verify's view of a repartition (:mod:`pgstream.runtime.repartition`): both stages are
checked, each against its own input.

* **Hand-over** (first stage): the replay of the source's partitions says which rows
  ``pgstream.repartition`` must hold for the stream, one per upstream position (partition,
  offset, output number) below the committed offset, with its repartition partition, key and
  payload. :func:`compare_handed_over` finds rows missing, extra (no such record, or above the
  upstream committed offset) or different.
* **Fold** (second stage): an ordinary stream whose source is the repartition table; its
  ledger and fold sink are checked like any fold, replayed from the rows in ``id`` order.

Together they check end to end: source -> hand-over rows -> fold. A fold declared with
``prune=True`` deletes consumed rows, so neither the lost hand-over rows nor the fold can be
checked then (:func:`pruned_streams` names them, and the report says so).
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg

from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.verify.expected import Expected
from pgstream.verify.report import VerifyReport, Violation
from pgstream.verify.values import show, values_equal

SINK = "pgstream.repartition"


def pruned_streams(app: App) -> dict[str, SinkSpec]:
    """Repartition stream -> its fold sink, for the folds declared with ``prune=True``."""
    return {
        s.repartition.stream: s
        for s in app.sinks
        if s.repartition is not None and s.repartition.prune
    }


def compare_handed_over(
    conn: psycopg.Connection[Any],
    app: App,
    spec: SinkSpec,
    expected: Expected,
    committed_of: dict[tuple[str, str], int | None],
    report: VerifyReport,
) -> None:
    """The rows of ``spec``'s repartition equal the replayed hand-overs, position by
    position (rows consumed and pruned are not missed when the fold prunes)."""
    rep = spec.repartition
    assert rep is not None
    want = expected.plans.handed_over.get((rep.stream, rep.upstream), {})
    seen: set[tuple[str, int, int]] = set()
    rows = conn.execute(
        queries.REPARTITION_ROWS, {"job": app.name, "stream": rep.stream, "source": rep.upstream}
    )
    for part, offset, seq, rpart, kj, payload in rows:
        pos = (str(part), int(offset), int(seq))
        committed = committed_of.get((rep.upstream, pos[0]))
        found = want.get(pos)
        if found is None:
            above = committed is None or pos[1] >= committed
            why = "above the committed offset" if above else "for no record's output"
            report.violations.append(
                Violation("unexpected", SINK, rep.upstream, pos[0], pos[1],
                          detail=f"_seq {seq}: a hand-over to {rep.stream!r} {why}")
            )
            continue
        seen.add(pos)
        w_rpart, w_kj, w_payload = found
        got = orjson.loads(payload)
        if rpart != w_rpart or orjson.loads(kj) != orjson.loads(w_kj) or not values_equal(
            w_payload, got
        ):
            report.violations.append(
                Violation("wrong-value", SINK, rep.upstream, pos[0], pos[1],
                          detail=f"_seq {seq}: expected partition {w_rpart} key {w_kj} "
                          f"{show(w_payload)}, found partition {rpart} key {kj} {show(got)}")
            )
    if rep.prune:
        return
    for part, offset, seq in sorted(want.keys() - seen):
        report.violations.append(
            Violation("lost", SINK, rep.upstream, part, offset,
                      detail=f"_seq {seq}: hand-over to {rep.stream!r} missing")
        )

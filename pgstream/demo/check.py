"""Reading the demo's results back with SQL and checking them against the reference."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

from pgstream.db import queries
from pgstream.demo import JOB
from pgstream.demo.data import Expected, UserLast, UserTotal


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the exactly-once check."""

    ok: bool
    text: str


TOP_USERS = """
SELECT t.user_id, t.n, t.total_cents, t.avg_cents, l.orders, l.last_order_at, l.paid_streak
  FROM demo_user_totals t LEFT JOIN demo_user_last l USING (user_id)
 ORDER BY t.total_cents DESC, t.user_id
 LIMIT %s
"""

QUERY_HINT = (
    "SELECT user_id, n, total_cents / 100.0 AS total_eur FROM demo_user_totals "
    "ORDER BY total_cents DESC LIMIT 5"
)


def top_users(conn: psycopg.Connection[Any], limit: int = 10) -> list[tuple[Any, ...]]:
    """The users with the largest paid totals, with their latest order."""
    return conn.execute(TOP_USERS, [limit]).fetchall()


def _facts(conn: psycopg.Connection[Any], ref: Expected) -> Check:
    rows = conn.execute(
        "SELECT order_id, user_id, cents FROM demo_order_facts ORDER BY order_id, _seq"
    ).fetchall()
    got = [(int(r[0]), str(r[1]), int(r[2])) for r in rows]
    want = len(ref.facts)
    if got == ref.facts:
        return Check(True, f"facts: {len(got):,} rows = expected, each paid order once")
    dupes = len(got) - len({r[0] for r in got})
    return Check(
        False, f"facts: {len(got):,} rows, expected {want:,} ({dupes:,} duplicated order ids)"
    )


def _totals(conn: psycopg.Connection[Any], ref: Expected) -> Check:
    rows = conn.execute("SELECT user_id, n, total_cents, avg_cents FROM demo_user_totals")
    got: dict[str, UserTotal] = {}
    bad_avg = 0
    for user, n, total, avg in rows:
        got[user] = UserTotal(int(n), int(total))
        if abs(Decimal(avg) - Decimal(int(total)) / int(n)) > Decimal("1e-9"):
            bad_avg += 1
    if got == ref.totals and not bad_avg:
        return Check(True, f"totals: {len(got):,} users, count/sum/avg match")
    wrong = sum(1 for u, t in ref.totals.items() if got.get(u) != t)
    return Check(
        False,
        f"totals: {wrong:,} of {len(ref.totals):,} users differ, "
        f"{len(set(got) - set(ref.totals)):,} unexpected, {bad_avg:,} wrong averages",
    )


def _last(conn: psycopg.Connection[Any], ref: Expected) -> Check:
    rows = conn.execute(
        "SELECT user_id, orders, last_order_id, last_order_at, last_status, paid_streak "
        "FROM demo_user_last"
    )
    got = {u: UserLast(int(n), int(o), at, s, int(k)) for u, n, o, at, s, k in rows}
    if got == ref.last:
        return Check(True, f"fold state: {len(got):,} users' last order and streak match")
    wrong = sum(1 for u, v in ref.last.items() if got.get(u) != v)
    return Check(False, f"fold state: {wrong:,} of {len(ref.last):,} users differ")


def _dead_letters(conn: psycopg.Connection[Any], ref: Expected) -> Check:
    rows = conn.execute(queries.DEMO_DEAD_LETTERS, {"job": JOB}).fetchall()
    offsets = [int(r[0]) for r in rows]
    if offsets == ref.dead_offsets:
        kinds = ", ".join(sorted({str(r[1]) for r in rows}))
        return Check(True, f"dead letters: {len(rows)} (malformed lines; {kinds})")
    return Check(
        False,
        f"dead letters: {len(rows)} at offsets {offsets}, expected {ref.dead_offsets}",
    )


def _ledger(conn: psycopg.Connection[Any], ref: Expected) -> Check:
    row = conn.execute(queries.DEMO_LEDGER, {"job": JOB}).fetchone()
    assert row is not None
    n, lo, hi, covered, committed = row
    if (lo, hi, covered, committed) == (0, ref.size, ref.size, ref.size):
        batches = f"{n} batch{'es' if n != 1 else ''}"
        return Check(True, f"ledger: {batches} tile bytes 0..{ref.size:,}, no gap or overlap")
    return Check(
        False,
        f"ledger: {n} batches cover {lo}..{hi} ({covered} bytes), committed offset "
        f"{committed}, file has {ref.size} bytes",
    )


def run_checks(conn: psycopg.Connection[Any], ref: Expected) -> list[Check]:
    """Compare every sink (and the ledger) with the reference computed from the input."""
    return [check(conn, ref) for check in (_facts, _totals, _last, _dead_letters, _ledger)]


def steady_rate(conn: psycopg.Connection[Any]) -> float | None:
    """Records/s between each worker's first and last checkpoint (from the ledger)."""
    row = conn.execute(queries.DEMO_STEADY_RATE, {"job": JOB}).fetchone()
    if row is None or not row[0] or not row[1]:
        return None
    return float(row[0]) / float(row[1])


__all__ = ["QUERY_HINT", "Check", "run_checks", "steady_rate", "top_users"]

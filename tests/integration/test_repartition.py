"""A fold keyed differently from its source's partitioning goes through a repartition table
(issue 12 part 5): its results equal the single-process reference, each key's state lives in
exactly one repartition partition, every record is handed over exactly once, and ``verify``
replays both stages clean."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.runtime.worker import run_app
from pgstream.verify import verify_app

MOD = 1_000_003
REP_PARTS = 3


def user_step(state: dict[str, int], r: dict[str, Any]) -> dict[str, int]:
    """Commutative per-user state (the arrival order across partitions is not fixed)."""
    return {
        "n": state["n"] + 1,
        "total": state["total"] + r["amount"],
        "sq": (state["sq"] + r["id"] * r["id"]) % MOD,
    }


def _reference(rows: list[tuple[int, int, int]]) -> dict[int, tuple[int, int, int]]:
    want: dict[int, tuple[int, int, int]] = {}
    for i, user, amount in rows:
        if amount == 0:
            continue
        n, total, sq = want.get(user, (0, 0, 0))
        want[user] = (n + 1, total + amount, (sq + i * i) % MOD)
    return want


def _split_app(partitions: int | None = REP_PARTS, prune: bool = False) -> ps.App:
    app = ps.App("repart", batch_size=97, max_interval=0.05, poll_interval=0.02)
    orders = app.stream(
        "orders", ps.TableSource("orders", partitions=4, partition_by="order_id")
    )
    orders.filter(lambda r: r["amount"] != 0).key_by("user_id").fold(
        {"n": 0, "total": 0, "sq": 0}, user_step, partitions=partitions, prune=prune
    ).to_table("user_state")
    return app


def _setup(conn: psycopg.Connection[Any], n: int) -> list[tuple[int, int, int]]:
    conn.execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, order_id int NOT NULL, "
        "user_id int NOT NULL, amount int NOT NULL);"
        "CREATE TABLE user_state (user_id int PRIMARY KEY, n bigint, total bigint, sq bigint)"
    )
    with conn.cursor() as cur, cur.copy(
        "COPY orders (order_id, user_id, amount) FROM STDIN"
    ) as copy:
        for i in range(n):
            copy.write_row((i // 3, (i * 7) % 23, (i * 13) % 11 - 2))
    return [
        (int(a), int(b), int(c))
        for a, b, c in conn.execute("SELECT id, user_id, amount FROM orders").fetchall()
    ]


def _sink(conn: psycopg.Connection[Any]) -> dict[int, tuple[int, int, int]]:
    rows = conn.execute("SELECT user_id, n, total, sq FROM user_state").fetchall()
    return {int(u): (int(n), int(t), int(s)) for u, n, t, s in rows}


def test_fold_keyed_across_split_table_partitions_equals_the_reference(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    rows = _setup(pg_conn, 3000)
    app = _split_app()
    assert "orders:fold:user_state:repartition" in app.sources
    run_app(app, pg_dsn, stop_when_idle=True)
    assert _sink(pg_conn) == _reference(rows)

    kept = sum(1 for _, _, a in rows if a != 0)
    handed = pg_conn.execute(
        "SELECT count(*), count(DISTINCT (src_partition, src_offset)), count(DISTINCT rpart) "
        "FROM pgstream.repartition WHERE job = 'repart'"
    ).fetchone()
    assert handed == (kept, kept, REP_PARTS)
    # one key, one place: each user's state is in exactly one repartition partition
    places = pg_conn.execute(
        "SELECT key, count(*) FROM pgstream.state WHERE job = 'repart' GROUP BY key"
    ).fetchall()
    assert len(places) == len(_reference(rows)) and all(c == 1 for _, c in places)
    parts = pg_conn.execute(
        "SELECT source, count(*) FROM pgstream.partitions WHERE job = 'repart' GROUP BY source"
    ).fetchall()
    assert dict(parts) == {"orders": 4, "orders:fold:user_state:repartition": REP_PARTS}

    report = verify_app(app, pg_dsn)
    assert report.ok, report.summary()


def test_verify_finds_a_tampered_hand_over_and_a_tampered_fold(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    _setup(pg_conn, 400)
    app = _split_app()
    run_app(app, pg_dsn, stop_when_idle=True)
    assert verify_app(app, pg_dsn).ok
    first = "(SELECT min(id) FROM pgstream.repartition)"
    pg_conn.execute(
        "UPDATE pgstream.repartition SET payload = jsonb_set(payload, '{amount}', '99') "
        f"WHERE id = {first}"
    )
    report = verify_app(app, pg_dsn)
    kinds = {(v.kind, v.sink) for v in report.violations}
    # the hand-over differs from its record, and the fold replayed from it from the sink
    assert ("wrong-value", "pgstream.repartition") in kinds, report.violations
    assert ("wrong-value", "user_state") in kinds, report.violations

    # the row now claims another upstream position: its own is lost, the other unexpected
    pg_conn.execute(f"UPDATE pgstream.repartition SET src_seq = 1 WHERE id = {first}")
    report = verify_app(app, pg_dsn)
    kinds = {(v.kind, v.sink) for v in report.violations}
    assert ("lost", "pgstream.repartition") in kinds, report.violations
    assert ("unexpected", "pgstream.repartition") in kinds, report.violations


def test_fold_over_many_files_keyed_by_a_field_equals_the_reference(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    rows: list[tuple[int, int, int]] = []
    for f in range(3):
        lines = []
        for j in range(500):
            i = f * 1000 + j
            lines.append(json.dumps({"id": i, "user_id": i % 17, "amount": i % 9 - 1}))
            rows.append((i, i % 17, i % 9 - 1))
        (tmp_path / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    pg_conn.execute(
        "CREATE TABLE user_state (user_id int PRIMARY KEY, n bigint, total bigint, sq bigint)"
    )
    app = ps.App("repfiles", batch_size=120, max_interval=0.05, poll_interval=0.02)
    clicks = app.stream("clicks", ps.FileSource(f"{tmp_path}/*.jsonl"))
    clicks.filter(lambda r: r["amount"] != 0).key_by("user_id").fold(
        {"n": 0, "total": 0, "sq": 0}, user_step
    ).to_table("user_state")
    run_app(app, pg_dsn, stop_when_idle=True)
    assert _sink(pg_conn) == _reference(rows)
    rparts = pg_conn.execute(
        "SELECT count(*) FROM pgstream.partitions "
        "WHERE job = 'repfiles' AND source LIKE '%%:repartition'"
    ).fetchone()
    assert rparts == (8,)  # no declared count for many files: the default
    assert verify_app(app, pg_dsn).ok


def test_changing_the_repartition_count_is_a_plan_and_source_change(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    _setup(pg_conn, 100)
    run_app(_split_app(), pg_dsn, stop_when_idle=True)
    with pytest.raises(Exception) as err:
        run_app(_split_app(partitions=5), pg_dsn, stop_when_idle=True)
    text = str(err.value)
    assert "into 3 partitions" in text and "into 5 partitions" in text, text


def test_prune_deletes_consumed_rows_and_verify_says_what_it_cannot_check(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    rows = _setup(pg_conn, 600)
    app = _split_app(prune=True)
    run_app(app, pg_dsn, stop_when_idle=True)
    assert _sink(pg_conn) == _reference(rows)
    left = pg_conn.execute(
        "SELECT count(*) FROM pgstream.repartition r JOIN pgstream.partitions p "
        "ON p.job = r.job AND p.source = r.stream AND p.partition = r.rpart::text "
        "WHERE r.job = 'repart' AND r.id < p.committed_offset"
    ).fetchone()
    assert left == (0,)  # every consumed row is gone
    report = verify_app(app, pg_dsn)
    assert report.ok, report.summary()
    assert any("prunes consumed rows" in note for note in report.unchecked), report.unchecked

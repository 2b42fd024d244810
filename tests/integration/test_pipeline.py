"""End-to-end pipelines on a real PostgreSQL: outputs equal a reference computed in Python."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.errors import RecordFailedError, SinkSchemaError
from pgstream.runtime.worker import run_app

EVENTS = [
    {"id": i, "user": f"u{i % 7}", "amount": (i * 37) % 23 - 3, "tags": ["a", "b"][: i % 3]}
    for i in range(1, 2001)
]


def write_jsonl(path: Path, rows: list[Any], extra: list[str] = ()) -> None:  # type: ignore[assignment]
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra:
            f.write(line + "\n")


def make_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """
        CREATE TABLE facts (order_id bigint NOT NULL, "user" text, cents bigint,
            _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
            _seq int NOT NULL DEFAULT 0);
        CREATE UNIQUE INDEX ON facts (_source, _partition, _offset, _seq);
        CREATE TABLE tags (tag text, order_id bigint, _source text, _partition text,
            _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq));
        CREATE TABLE "User Totals" ("user" text PRIMARY KEY, n bigint NOT NULL, total numeric,
            lo numeric, hi numeric, mean numeric, _mean_sum numeric, _mean_count bigint);
        CREATE TABLE last_seen ("user" text PRIMARY KEY, n bigint, last_id bigint);
        CREATE TABLE audit (n int, first_offset bigint);
        """
    )


def build_app(path: Path, **settings: Any) -> ps.App:
    app = ps.App("shop", **settings)
    orders = app.stream("orders", ps.FileSource(path))
    valid = orders.filter(lambda o: o["amount"] > 0)
    valid.map(
        lambda o: {"order_id": o["id"], "user": o["user"], "cents": o["amount"] * 100}
    ).to_table("facts")
    orders.flat_map(lambda o: [{"tag": t, "order_id": o["id"]} for t in o["tags"]]).to_table("tags")
    valid.key_by("user").aggregate(
        n=ps.count(),
        total=ps.sum("amount"),
        lo=ps.min("amount"),
        hi=ps.max("amount"),
        mean=ps.avg("amount"),
    ).to_table('public."User Totals"')
    valid.key_by("user").fold(
        {"n": 0, "last_id": None}, lambda s, o: {"n": s["n"] + 1, "last_id": o["id"]}
    ).to_table("last_seen")

    @app.batch(orders)
    def audit(batch: ps.Batch) -> None:
        batch.execute(
            "INSERT INTO audit (n, first_offset) VALUES (%s, %s)",
            [len(batch.records), batch.start_offset],
        )

    return app


def reference(events: list[dict[str, Any]]) -> dict[str, Any]:
    valid = [e for e in events if e["amount"] > 0]
    per_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in valid:
        per_user[e["user"]].append(e)
    return {
        "facts": sorted((e["id"], e["user"], e["amount"] * 100) for e in valid),
        "tags": sorted((t, e["id"]) for e in events for t in e["tags"]),
        "totals": {
            u: (
                len(es),
                sum(e["amount"] for e in es),
                min(e["amount"] for e in es),
                max(e["amount"] for e in es),
            )
            for u, es in per_user.items()
        },
        "last_seen": {u: (len(es), es[-1]["id"]) for u, es in per_user.items()},
    }


def check_outputs(conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> None:
    ref = reference(events)
    facts = conn.execute('SELECT order_id, "user", cents FROM facts ORDER BY 1').fetchall()
    assert facts == ref["facts"]
    assert conn.execute("SELECT tag, order_id FROM tags ORDER BY 1, 2").fetchall() == sorted(
        ref["tags"]
    )
    seqs = conn.execute("SELECT max(_seq) FROM tags").fetchone()
    assert seqs is not None and seqs[0] == 1  # two tags for one record -> _seq 0 and 1
    totals = {
        r[0]: (r[1], r[2], r[3], r[4], r[5], r[6])
        for r in conn.execute('SELECT * FROM "User Totals"').fetchall()
    }
    assert set(totals) == set(ref["totals"])
    for user, (n, total, lo, hi) in ref["totals"].items():
        got = totals[user]
        assert got[:4] == (n, Decimal(total), Decimal(lo), Decimal(hi))
        assert abs(got[4] - Decimal(total) / n) < Decimal("1e-9")
    last = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT * FROM last_seen").fetchall()}
    assert last == ref["last_seen"]


def test_pipeline_matches_reference(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    path = tmp_path / "orders.jsonl"
    write_jsonl(path, EVENTS[:1000])
    make_tables(pg_conn)
    app = build_app(path, batch_size=97)
    summary = run_app(app, pg_dsn, stop_when_idle=True)
    assert summary.records == 1000
    check_outputs(pg_conn, EVENTS[:1000])

    # The file grows; a new worker (fresh process state: fold state reloads from the table)
    # continues exactly where the checkpoint is.
    write_jsonl(path, EVENTS)
    summary = run_app(build_app(path, batch_size=97), pg_dsn, stop_when_idle=True)
    assert summary.records == 1000
    check_outputs(pg_conn, EVENTS)
    audited = pg_conn.execute("SELECT sum(n) FROM audit").fetchone()
    assert audited is not None and audited[0] == len(EVENTS)
    ledger = pg_conn.execute(
        "SELECT start_offset, end_offset FROM pgstream.batches ORDER BY start_offset"
    ).fetchall()
    assert ledger[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ledger))
    assert ledger[-1][1] == path.stat().st_size


def test_bad_records_go_to_dead_letters(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    path = tmp_path / "orders.jsonl"
    rows = EVENTS[:50]
    write_jsonl(path, rows[:20], extra=["{not json", '{"id": 999, "user": "x"}'])
    with path.open("a") as f:
        for r in rows[20:]:
            f.write(json.dumps(r) + "\n")
    make_tables(pg_conn)
    run_app(build_app(path), pg_dsn, stop_when_idle=True)
    check_outputs(pg_conn, rows)
    dead = pg_conn.execute(
        'SELECT "offset", operator, error, payload FROM pgstream.dead_letters ORDER BY 1'
    ).fetchall()
    assert len(dead) == 2
    assert dead[0][1] == "decode" and "JSON" in dead[0][2] and dead[0][3] == b"{not json"
    assert "KeyError" in dead[1][2] and json.loads(dead[1][3]) == {"id": 999, "user": "x"}


def test_on_error_fail_stops_without_committing(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    path = tmp_path / "orders.jsonl"
    write_jsonl(path, EVENTS[:10], extra=["[1, 2"])
    make_tables(pg_conn)
    with pytest.raises(RecordFailedError, match="offset"):
        run_app(build_app(path, on_error="fail"), pg_dsn, stop_when_idle=True)
    assert pg_conn.execute("SELECT count(*) FROM facts").fetchone() == (0,)
    assert pg_conn.execute("SELECT count(*) FROM pgstream.dead_letters").fetchone() == (0,)


def fold_app(path: Path, **settings: Any) -> ps.App:
    """A fold whose state must come back exactly as returned (a datetime on "bad" records)."""
    app = ps.App("fold-json", batch_size=10, **settings)

    def step(state: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
        assert type(state["n"]) is int and type(state["last"]) in (str, type(None)), state
        last: Any = rec["ts"]
        if rec.get("bad"):
            last = datetime.fromisoformat(rec["ts"])  # not plain JSON: would come back a str
        return {"n": state["n"] + 1, "last": last}

    s = app.stream("s", ps.FileSource(path))
    s.key_by("k").fold({"n": 0, "last": None}, step).to_table("fold_out")
    return app


def test_fold_state_that_does_not_round_trip_is_dead_lettered(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    path = tmp_path / "f.jsonl"
    rows = [
        {"k": i % 3, "ts": f"2026-01-01T00:00:{i:02d}+00:00", "bad": i in (4, 25)}
        for i in range(40)
    ]
    write_jsonl(path, rows)
    pg_conn.execute("CREATE TABLE fold_out (k int PRIMARY KEY, n bigint, last text)")
    run_app(fold_app(path), pg_dsn, stop_when_idle=True)
    dead = pg_conn.execute(
        'SELECT payload, operator, error FROM pgstream.dead_letters ORDER BY "offset"'
    ).fetchall()
    assert [json.loads(p)["ts"][-11:-6] for p, _, _ in dead] == ["00:04", "00:25"]
    assert {op for _, op, _ in dead} == {"fold->fold_out"}
    assert (
        "fold state is not plain JSON: state['last'] is a datetime (returned by the fold on "
        "key 1); store a str instead, e.g. ts.isoformat()"
    ) in dead[0][2]
    good = [r for r in rows if not r["bad"]]
    want = {
        k: (sum(1 for r in good if r["k"] == k), [r for r in good if r["k"] == k][-1]["ts"])
        for k in range(3)
    }
    got = {k: (n, last) for k, n, last in pg_conn.execute("SELECT k, n, last FROM fold_out")}
    assert got == want
    states = pg_conn.execute("SELECT count(*) FROM pgstream.state").fetchone()
    assert states == (3,)


def test_fold_state_that_does_not_round_trip_stops_with_on_error_fail(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    path = tmp_path / "f.jsonl"
    write_jsonl(path, [{"k": 7, "ts": "2026-01-01T00:00:00+00:00", "bad": True}])
    pg_conn.execute("CREATE TABLE fold_out (k int PRIMARY KEY, n bigint, last text)")
    with pytest.raises(
        RecordFailedError,
        match=r"fold state is not plain JSON: state\['last'\] is a datetime \(returned by the "
        r"fold on key 7\); store a str instead",
    ):
        run_app(fold_app(path, on_error="fail"), pg_dsn, stop_when_idle=True)
    assert pg_conn.execute("SELECT count(*) FROM fold_out").fetchone() == (0,)
    assert pg_conn.execute("SELECT count(*) FROM pgstream.batches").fetchone() == (0,)


def test_missing_sink_pieces_are_named(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    path = tmp_path / "o.jsonl"
    write_jsonl(path, EVENTS[:3])
    app = ps.App("v")
    app.stream("o", ps.FileSource(path)).map(lambda o: {"id": o["id"]}).to_table("nowhere")
    with pytest.raises(SinkSchemaError, match="nowhere does not exist") as info:
        run_app(app, pg_dsn, stop_when_idle=True)
    assert info.value.hint is not None and "create it" in info.value.hint

    pg_conn.execute(
        "CREATE TABLE nowhere (id bigint, _source text, _partition text, _offset bigint)"
    )
    with pytest.raises(SinkSchemaError, match="no column _seq"):
        run_app(app, pg_dsn, stop_when_idle=True)
    pg_conn.execute("ALTER TABLE nowhere ADD COLUMN _seq int")
    with pytest.raises(SinkSchemaError, match="no unique index"):
        run_app(app, pg_dsn, stop_when_idle=True)

    app2 = ps.App("v2")
    app2.stream("o", ps.FileSource(path)).key_by("user").aggregate(n=ps.count()).to_table("agg")
    pg_conn.execute('CREATE TABLE agg ("user" text PRIMARY KEY)')
    with pytest.raises(SinkSchemaError, match="no column n"):
        run_app(app2, pg_dsn, stop_when_idle=True)


def test_sink_names_fold_like_sql(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    """to_table("Facts") writes facts; only "Facts" existing is an error naming '"Facts"'."""
    path = tmp_path / "o.jsonl"
    write_jsonl(path, EVENTS[:3])
    pg_conn.execute(
        'CREATE TABLE "Facts" (id bigint, _source text, _partition text, _offset bigint,'
        " _seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    app = ps.App("names")
    app.stream("o", ps.FileSource(path)).map(lambda o: {"id": o["id"]}).to_table("Facts")
    with pytest.raises(
        SinkSchemaError, match=r"sink table Facts does not exist \(looked for facts\)"
    ) as info:
        run_app(app, pg_dsn, stop_when_idle=True)
    assert info.value.hint is not None
    assert (
        "a table named '\"Facts\"' exists" in info.value.hint and "fold to lower" in info.value.hint
    )
    pg_conn.execute('CREATE TABLE facts (LIKE "Facts" INCLUDING ALL)')
    run_app(app, pg_dsn, stop_when_idle=True)
    assert pg_conn.execute("SELECT count(*) FROM facts").fetchone() == (3,)
    assert pg_conn.execute('SELECT count(*) FROM "Facts"').fetchone() == (0,)
    app2 = ps.App("names2")
    app2.stream("o", ps.FileSource(path)).map(lambda o: {"id": o["id"]}).to_table('"Facts"')
    run_app(app2, pg_dsn, stop_when_idle=True)
    assert pg_conn.execute('SELECT count(*) FROM "Facts"').fetchone() == (3,)


def test_map_output_with_unknown_field_is_a_clear_error(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    path = tmp_path / "o.jsonl"
    write_jsonl(path, EVENTS[:3])
    make_tables(pg_conn)
    app = ps.App("x")
    app.stream("o", ps.FileSource(path)).map(lambda o: {"order_id": o["id"], "bogus": 1}).to_table(
        "facts"
    )
    with pytest.raises(SinkSchemaError, match="bogus"):
        run_app(app, pg_dsn, stop_when_idle=True)


def test_unmigrated_database_is_reported(tmp_path: Path, pg_empty_dsn: str) -> None:
    from pgstream.errors import DatabaseError

    path = tmp_path / "o.jsonl"
    write_jsonl(path, EVENTS[:3])
    app = ps.App("x")
    app.stream("o", ps.FileSource(path)).to_table("t")
    with pytest.raises(DatabaseError, match="pgstream db upgrade"):
        run_app(app, pg_empty_dsn, stop_when_idle=True)


def test_tumbling_windows_upsert_per_key_and_window(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    from datetime import datetime, timezone

    base = 1_767_225_600  # 2026-01-01T00:00:00Z
    events: list[dict[str, Any]] = [
        {"user": f"u{i % 3}", "amount": i, "ts": base + (i * 7) % 300} for i in range(600)
    ]
    for i, e in enumerate(events):  # mixed timestamp spellings
        if i % 2:
            e["ts"] = (
                datetime.fromtimestamp(e["ts"], timezone.utc).isoformat().replace("+00:00", "Z")
            )
    path = tmp_path / "w.jsonl"
    write_jsonl(path, events)
    pg_conn.execute(
        'CREATE TABLE per_minute ("user" text, window_start timestamptz, n bigint, '
        'total numeric, PRIMARY KEY ("user", window_start))'
    )
    app = ps.App("win", batch_size=50)
    app.stream("e", ps.FileSource(path)).key_by("user").window(
        ps.tumbling(seconds=60), time="ts"
    ).aggregate(n=ps.count(), total=ps.sum("amount")).to_table("per_minute")
    run_app(app, pg_dsn, stop_when_idle=True)

    expected: dict[tuple[str, datetime], list[int]] = defaultdict(lambda: [0, 0])
    for i in range(600):
        start = datetime.fromtimestamp(base + ((i * 7) % 300) // 60 * 60, timezone.utc)
        acc = expected[(f"u{i % 3}", start)]
        acc[0] += 1
        acc[1] += i
    rows = pg_conn.execute('SELECT "user", window_start, n, total FROM per_minute').fetchall()
    assert {(u, w): [n, int(t)] for u, w, n, t in rows} == dict(expected)


def test_two_folds_keep_separate_state(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    path = tmp_path / "f.jsonl"
    write_jsonl(path, [{"k": i % 4, "v": i} for i in range(100)])
    pg_conn.execute("CREATE TABLE f_sum (k int PRIMARY KEY, value bigint)")
    pg_conn.execute("CREATE TABLE f_max (k int PRIMARY KEY, value bigint)")
    app = ps.App("folds", batch_size=7)
    s = app.stream("s", ps.FileSource(path))
    s.key_by("k").fold(0, lambda acc, r: acc + r["v"]).to_table("f_sum")
    s.key_by("k").fold(-1, lambda acc, r: max(acc, r["v"])).to_table("f_max")
    run_app(app, pg_dsn, stop_when_idle=True)
    sums = dict(pg_conn.execute("SELECT k, value FROM f_sum").fetchall())
    maxes = dict(pg_conn.execute("SELECT k, value FROM f_max").fetchall())
    assert sums == {k: sum(i for i in range(100) if i % 4 == k) for k in range(4)}
    assert maxes == {k: max(i for i in range(100) if i % 4 == k) for k in range(4)}
    states = pg_conn.execute(
        "SELECT operator, count(*) FROM pgstream.state GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [n for _, n in states] == [4, 4]

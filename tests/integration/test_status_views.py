"""``pgstream.partition_status`` / ``pgstream.job_status`` and ``pgstream status [--watch]``.

Real processes against the real server: the views return what ``status`` shows and agree with
the ledger, ``status --watch`` renders a live table (records/s of a running job included), and
the views the migration creates are those of ``pgstream.db.tables``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg
from proctools import cli_env, run_cli, start_cli, wait_for
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from pgstream.db.connect import connect, sqlalchemy_url
from pgstream.db.tables import SCHEMA, VIEWS, metadata

APP = """
import os
import time
import pgstream as ps

app = ps.App("viewed")
orders = app.stream("orders", ps.FileSource(os.environ["ORDERS"]))
orders.map(lambda o: {"id": o["id"] // (o["id"] % 50)}).to_table("ids")


@app.batch(orders)
def slow(batch: ps.Batch) -> None:
    time.sleep(float(os.environ.get("BATCH_SLEEP", "0")))
"""

#: columns status --json and the view share, compared one to one
SHARED = (
    "job",
    "source",
    "partition",
    "committed_offset",
    "source_head",
    "lag",
    "owner",
    "epoch",
    "batches",
    "records",
    "leased",
    "dead_letters",
)


def setup(tmp_path: Path, conn: psycopg.Connection[Any], files: dict[str, range]) -> dict[str, str]:
    (tmp_path / "app.py").write_text(APP)
    landing = tmp_path / "landing"
    landing.mkdir()
    for name, ids in files.items():
        (landing / name).write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    conn.execute(
        "CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint, _seq int,"
        " UNIQUE (_source, _partition, _offset, _seq))"
    )
    return cli_env(ORDERS=str(landing / "*.jsonl"), PYTHONUNBUFFERED="1")


def view_rows(conn: psycopg.Connection[Any], view: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT * FROM {SCHEMA}.{view} ORDER BY 1, 2, 3")
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def test_views_return_what_status_shows_and_agree_with_the_ledger(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    files = {"a.jsonl": range(1, 301), "b.jsonl": range(301, 501)}
    env = setup(tmp_path, pg_conn, files)
    args = ["--dsn", pg_dsn, "--stop-when-idle", "--batch-size", "64"]
    done = run_cli("run", "app:app", *args, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    status = run_cli("status", "--dsn", pg_dsn, "--json", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    rows = view_rows(pg_conn, "partition_status")
    assert [p["partition"] for p in shown] == ["a.jsonl", "b.jsonl"]
    assert [{k: p[k] for k in SHARED} for p in shown] == [{k: r[k] for k in SHARED} for r in rows]
    ledger = dict(
        (r[0], r[1:])
        for r in pg_conn.execute(
            "SELECT partition, sum(records_in), max(end_offset), count(*)"
            " FROM pgstream.batches GROUP BY 1"
        ).fetchall()
    )
    dead = dict(
        pg_conn.execute("SELECT partition, count(*) FROM pgstream.dead_letters GROUP BY 1")
        .fetchall()
    )
    sizes = {name: (tmp_path / "landing" / name).stat().st_size for name in files}
    for r in rows:
        records, end, batches = ledger[r["partition"]]
        assert (r["records"], r["committed_offset"], r["batches"]) == (records, end, batches)
        assert r["committed_offset"] == sizes[r["partition"]] and r["lag"] == 0
        assert r["dead_letters"] == r["dead_letters_open"] == dead[r["partition"]] > 0
        assert r["owner"] is None and not r["leased"]  # a clean stop released the lease
        assert r["last_commit_age"].total_seconds() >= 0
    (job,) = view_rows(pg_conn, "job_status")
    assert job["job"] == "viewed" and job["plan_version"] == 1
    assert (job["partitions"], job["owned_partitions"], job["owners"]) == (2, 0, 0)
    assert job["records"] == 500 == sum(r["records"] for r in rows)
    assert job["dead_letters"] == sum(dead.values()) and job["lag"] == 0
    assert job["last_commit_at"] == max(r["last_commit_at"] for r in rows)


def test_status_watch_renders_a_live_table_of_a_running_job(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], procs: list[Any]
) -> None:
    env = setup(tmp_path, pg_conn, {"a.jsonl": range(1, 5001)})
    env["BATCH_SLEEP"] = "0.05"
    args = ["--dsn", pg_dsn, "--batch-size", "20"]
    job = start_cli("run", "app:app", *args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    procs.append(job)
    def batches() -> int:
        row = pg_conn.execute("SELECT count(*) FROM pgstream.batches").fetchone()
        return int(row[0]) if row else 0

    wait_for(batches, 30, what="the job's first batch")
    args = ["--dsn", pg_dsn, "--watch", "--interval", "0.5", "--count", "3"]
    watch = run_cli("status", *args, cwd=tmp_path, env=env)
    assert watch.returncode == 0, watch.stderr
    out = watch.stdout
    assert out.count("pgstream status (live") == 3, out
    for header in ("lag", "records/s", "last commit", "owner", "epoch", "watermark"):
        assert header in out
    assert 'job "viewed" (plan v1): 1/1 partitions owned by 1 worker' in out
    rows = [line for line in out.splitlines() if "a.jsonl" in line]
    assert len(rows) == 3
    assert "s ago" in rows[-1]
    # the first look has no rate yet; later ones see the running job's records per second
    rates = [re.findall(r"│\s*([\d,]+|-)\s*│\s*\d+s ago", row) for row in rows]
    assert rates[0] == ["-"], rows[0]
    assert all(r and r[0] != "-" and int(r[0].replace(",", "")) > 0 for r in rates[1:]), rows
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 0, err


def test_status_watch_and_json_do_not_go_together(tmp_path: Path, pg_dsn: str) -> None:
    done = run_cli("status", "--dsn", pg_dsn, "--watch", "--json", cwd=tmp_path)
    assert done.returncode == 2
    assert "--watch shows a live table; --json prints once: pick one" in done.stderr


def _viewdefs(dsn: str) -> dict[str, str]:
    with connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT viewname, definition FROM pg_views WHERE schemaname = %s", [SCHEMA]
        ).fetchall()
    return dict(rows)


def test_the_migrated_views_are_the_metadata_views(pg_dsn: str, pg_empty_dsn: str) -> None:
    engine = create_engine(sqlalchemy_url(pg_empty_dsn), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
            metadata.create_all(conn)
    finally:
        engine.dispose()
    migrated = _viewdefs(pg_dsn)
    assert set(migrated) == set(VIEWS)
    assert migrated == _viewdefs(pg_empty_dsn)

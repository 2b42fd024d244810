"""The command line, as a user runs it: subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from proctools import run_cli

APP = """
import os
import pgstream as ps

app = ps.App("cli-job", batch_size=100)
orders = app.stream("orders", ps.FileSource(os.environ["ORDERS"]))
orders.map(lambda o: {"id": o["id"]}).to_table("ids")
orders.key_by("user").aggregate(n=ps.count()).to_table("per_user")
notapp = 42
"""


def pgstream(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env={**os.environ, **(env or {})})


def setup(tmp_path: Path, conn: psycopg.Connection[Any], n: int = 5000) -> dict[str, str]:
    (tmp_path / "app.py").write_text(APP)
    orders = tmp_path / "orders.jsonl"
    orders.write_text("".join(json.dumps({"id": i, "user": i % 10}) + "\n" for i in range(n)))
    conn.execute(
        "CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint, _seq int,"
        " UNIQUE (_source, _partition, _offset, _seq));"
        'CREATE TABLE per_user ("user" int PRIMARY KEY, n bigint)'
    )
    return {"ORDERS": str(orders)}


def test_run_workers_and_status(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    env = setup(tmp_path, pg_conn)
    done = pgstream(
        "run",
        "app:app",
        "--dsn",
        pg_dsn,
        "--stop-when-idle",
        "--workers",
        "2",
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert pg_conn.execute("SELECT count(*), count(DISTINCT id) FROM ids").fetchone() == (
        5000,
        5000,
    )
    assert pg_conn.execute("SELECT sum(n) FROM per_user").fetchone() == (5000,)

    status = pgstream("status", "--dsn", pg_dsn, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    size = (tmp_path / "orders.jsonl").stat().st_size
    assert row["job"] == "cli-job" and row["committed_offset"] == size and row["lag"] == 0
    live = pgstream("status", "app:app", "--dsn", pg_dsn, cwd=tmp_path, env=env)
    assert live.returncode == 0 and "cli-job" in live.stdout


def test_env_dsn_is_used(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    env = setup(tmp_path, pg_conn, n=10)
    done = pgstream(
        "run",
        "app:app",
        "--stop-when-idle",
        cwd=tmp_path,
        env={**env, "PGSTREAM_DSN": pg_dsn, "DATABASE_URL": "postgresql://x@nowhere/y"},
    )
    assert done.returncode == 0, done.stderr
    assert pg_conn.execute("SELECT count(*) FROM ids").fetchone() == (10,)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") or proc.stderr.startswith("Usage:"), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_user_errors_are_one_clear_line(
    tmp_path: Path, pg_dsn: str, pg_empty_dsn: str, pg_conn: Any
) -> None:
    env = setup(tmp_path, pg_conn, n=10)
    assert_one_line_error(
        pgstream("run", "missing:app", "--dsn", pg_dsn, cwd=tmp_path),
        "cannot import module 'missing'",
    )
    assert_one_line_error(
        pgstream("run", "app:nothing", "--dsn", pg_dsn, cwd=tmp_path, env=env),
        "no attribute 'nothing'",
    )
    assert_one_line_error(
        pgstream("run", "app:notapp", "--dsn", pg_dsn, cwd=tmp_path, env=env), "not a pgstream App"
    )
    assert_one_line_error(pgstream("run", "app", "--dsn", pg_dsn, cwd=tmp_path), "MODULE:APP")
    assert_one_line_error(pgstream("run", cwd=tmp_path), "Missing argument")
    assert_one_line_error(
        pgstream(
            "run", "app:app", "--dsn", "postgresql://root@127.0.0.1:1/none", cwd=tmp_path, env=env
        ),
        "error:",
    )
    assert_one_line_error(
        pgstream("run", "app:app", "--dsn", pg_empty_dsn, cwd=tmp_path, env=env),
        "pgstream db upgrade",
    )
    pg_conn.execute("DROP TABLE per_user")
    assert_one_line_error(
        pgstream("run", "app:app", "--dsn", pg_dsn, cwd=tmp_path, env=env),
        "per_user does not exist",
    )
    missing_file = {"ORDERS": str(tmp_path / "nope.jsonl")}
    assert_one_line_error(
        pgstream("run", "app:app", "--dsn", pg_dsn, cwd=tmp_path, env=missing_file), "nope.jsonl"
    )


TABLE_APP = """
import pgstream as ps

app = ps.App("held-job")
orders = app.stream("orders", ps.TableSource("orders"))
orders.map(lambda o: {"id": o["id"]}).to_table("ids")
"""


def test_status_names_the_session_holding_a_table_source(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    """An idle transaction holding a nextval() insert keeps the job behind its table's head:
    `status app:app` says which session (pid, application_name, state, age, query)."""
    (tmp_path / "app.py").write_text(TABLE_APP)
    pg_conn.execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, who text);"
        "CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint, _seq int,"
        " UNIQUE (_source, _partition, _offset, _seq));"
        "INSERT INTO orders (who) VALUES ('early')"
    )
    done = pgstream("run", "app:app", "--dsn", pg_dsn, "--stop-when-idle", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(pg_dsn, application_name="stuck-importer") as holder:
        holder.execute("INSERT INTO orders (who) VALUES ('held')")  # id 2, not committed
        pg_conn.execute("INSERT INTO orders (who) SELECT 'later' FROM generate_series(1, 5)")
        done = pgstream("run", "app:app", "--dsn", pg_dsn, "--stop-when-idle", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert pg_conn.execute("SELECT array_agg(id) FROM ids").fetchone() == ([1],)
        time.sleep(1.1)  # status names transactions open for a second or more
        status = pgstream("status", "app:app", "--dsn", pg_dsn, "--json", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        (row,) = json.loads(status.stdout)
        assert row["committed_offset"] == 2 and row["source_head"] == 8 and row["lag"] == 6
        (held,) = row["held_by"]
        pid = holder.info.backend_pid
        assert held["pid"] == pid and held["application_name"] == "stuck-importer"
        assert held["state"] == "idle in transaction" and held["xact_age_seconds"] >= 1
        assert held["query"] == "INSERT INTO orders (who) VALUES ('held')"
        assert held["writes_table"] is True
        table = pgstream("status", "app:app", "--dsn", pg_dsn, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert "held-job orders/0 is held back by an open transaction" in table.stdout
        assert f"pid {pid} (stuck-importer), idle in transaction, transaction open" in table.stdout
        assert f"SELECT pg_terminate_backend({pid})" in table.stdout
        holder.commit()
    done = pgstream("run", "app:app", "--dsn", pg_dsn, "--stop-when-idle", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status = pgstream("status", "app:app", "--dsn", pg_dsn, "--json", cwd=tmp_path)
    (row,) = json.loads(status.stdout)
    assert row["lag"] == 0 and row["held_by"] is None
    # without MODULE:APP the sources are unknown: nothing is looked up
    (row,) = json.loads(pgstream("status", "--dsn", pg_dsn, "--json", cwd=tmp_path).stdout)
    assert row["held_by"] is None

"""``pgstream demo`` end to end, as a new user runs it: a subprocess, checked by its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgstream.db.connect import connect
from pgstream.demo.check import run_checks
from pgstream.demo.data import expected

EVENTS = "20000"


def run_demo(home: Path, *args: str, dsn_env: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGSTREAM_HOME": str(home)}
    if not dsn_env:
        env.pop("PGSTREAM_DSN", None)
        env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "pgstream", "demo", "--events", EVENTS, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_checked(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "facts: " in out and " rows = expected, each paid order once ✓" in out
    assert "totals: " in out and "count/sum/avg match ✓" in out
    assert "last order and streak match ✓" in out
    assert "dead letters: 2 (malformed lines" in out
    assert ", no gap or overlap ✓" in out
    assert "MISMATCH" not in out
    assert "records/s end to end" in out
    assert 'psql "postgresql://' in out


def test_demo_survives_kill_9_and_reruns(pg_dsn: str, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--dsn", pg_dsn)
    assert_checked(result)
    assert "simulating a crash: kill -9 worker pid" in result.stdout
    assert "nothing lost, nothing twice ✓" in result.stdout
    # a second run starts from a clean slate and checks out the same
    again = run_demo(tmp_path, "--dsn", pg_dsn)
    assert_checked(again)
    with connect(pg_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pgstream.partitions").fetchone()
        assert row == (1,)


def test_demo_without_crash(pg_dsn: str, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--dsn", pg_dsn, "--no-crash")
    assert_checked(result)
    assert "kill -9" not in result.stdout


def test_check_catches_tampering(pg_dsn: str, tmp_path: Path) -> None:
    """The check is not a rubber stamp: a duplicate, a wrong total and a lost dead letter fail."""
    assert_checked(run_demo(tmp_path, "--dsn", pg_dsn, "--no-crash"))
    ref = expected(tmp_path / "demo" / "orders.jsonl")
    with connect(pg_dsn, autocommit=True) as conn:
        assert all(c.ok for c in run_checks(conn, ref))
        conn.execute(
            "INSERT INTO demo_order_facts (order_id, user_id, cents, _source, _partition, "
            "_offset, _seq) SELECT order_id, user_id, cents, _source, _partition, _offset, 1 "
            "FROM demo_order_facts ORDER BY order_id LIMIT 1"
        )
        conn.execute("UPDATE demo_user_totals SET total_cents = total_cents + 1 WHERE n > 3")
        conn.execute("DELETE FROM pgstream.dead_letters WHERE operator = 'decode'")
        failed = [c.text.split(":")[0] for c in run_checks(conn, ref) if not c.ok]
    assert failed == ["facts", "totals", "dead letters"]


def test_demo_fails_on_bad_dsn(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--dsn", "postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode != 0
    assert "error: cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_on_embedded_server_with_nothing_configured(tmp_path: Path) -> None:
    pytest.importorskip("pgserver")
    from pgstream.db import embedded

    home = tmp_path / "home"
    try:
        result = run_demo(home, dsn_env=False)
        assert_checked(result)
        assert "embedded PostgreSQL" in result.stdout
        assert str(home / "pgdata") in result.stdout
        assert "?host=" in result.stdout  # the psql hint uses the unix socket directory
    finally:
        if (home / "pgdata" / "PG_VERSION").exists():
            embedded.start_server(home / "pgdata", cleanup=True)  # attach, then stop + delete
            embedded.stop_server(home / "pgdata")

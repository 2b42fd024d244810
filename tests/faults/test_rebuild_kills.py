"""``pgstream rebuild`` under faults: SIGKILL mid catch-up and before the swap's COMMIT, a
swap that finishes most of the replay in its own transaction, and a live worker (with
out-of-order inserts into a table source) running through the rebuild and the swap.

The app and the references are in ``tests/rebuildref.py``; every end state is compared with
a reference computed from the input, and ``pgstream verify`` must be clean.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import TableWriters, insert_events, wait_for
from rebuildref import (
    CORE,
    assert_tables,
    cli,
    dead_offsets,
    failing,
    file_records,
    leftovers,
    rebuild,
    reference,
    run,
    setup,
    table_records,
    tables,
    verify_clean,
)


def _snapshot(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """The live job's tables and checkpoint (what a failed rebuild must leave alone)."""
    return (
        tables(conn),
        dead_offsets(conn),
        conn.execute(
            "SELECT start_offset, end_offset, plan_version FROM pgstream.batches"
            " WHERE job = 'rebuildjob' ORDER BY 1"
        ).fetchall(),
        conn.execute(
            "SELECT committed_offset, epoch, watermarks FROM pgstream.partitions"
            " WHERE job = 'rebuildjob'"
        ).fetchall(),
        conn.execute(
            "SELECT operator, key, value FROM pgstream.state WHERE job = 'rebuildjob' ORDER BY 1, 2"
        ).fetchall(),
    )


def _shadow_offset(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT committed_offset FROM pgstream.partitions WHERE job = 'rebuildjob~rebuild'"
    ).fetchone()
    return -1 if row is None or row[0] is None else int(row[0])


def _v2_job(
    tmp_path: Path, conn: psycopg.Connection[Any], dsn: str, n: int
) -> tuple[dict[str, str], bytes]:
    """A job run with version 1, then version 2 recorded: its tables are version 1's."""
    env, data = setup(tmp_path, conn, n, REBUILDAPP_BATCH="20")
    run(tmp_path, env, dsn)
    v2 = {**env, "REBUILDAPP_V2": "1"}
    run(tmp_path, v2, dsn, "--accept-changes")
    return v2, data


@pytest.mark.parametrize("after", [1, 6])
def test_kill_mid_catch_up_then_rebuild_again_resumes_and_is_exact(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], after: int
) -> None:
    env, data = _v2_job(tmp_path, pg_conn, pg_dsn, 700)
    before = _snapshot(pg_conn)
    crash = {**env, "PGSTREAM_CRASH_AT": "rebuild_after_batch", "PGSTREAM_CRASH_AFTER": str(after)}
    done = rebuild(tmp_path, crash, pg_dsn, "--yes", check=False)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert _snapshot(pg_conn) == before  # the live job saw nothing
    assert 0 < _shadow_offset(pg_conn) < len(data)
    verify_clean(tmp_path, env, pg_dsn)
    out = rebuild(tmp_path, env, pg_dsn, "--yes")
    assert "resuming" in out.stdout, out.stdout
    assert_tables(pg_conn, reference(file_records(data), v2=True))
    assert dead_offsets(pg_conn) == failing(file_records(data))
    assert leftovers(pg_conn) == 0
    verify_clean(tmp_path, env, pg_dsn)


def test_kill_before_the_swap_commits_changes_nothing(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _v2_job(tmp_path, pg_conn, pg_dsn, 500)
    before = _snapshot(pg_conn)
    crash = {**env, "PGSTREAM_CRASH_AT": "rebuild_before_commit"}
    done = rebuild(tmp_path, crash, pg_dsn, "--yes", check=False)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert _snapshot(pg_conn) == before
    assert _shadow_offset(pg_conn) == len(data)  # caught up, not swapped
    verify_clean(tmp_path, env, pg_dsn)
    rebuild(tmp_path, env, pg_dsn, "--yes")
    assert_tables(pg_conn, reference(file_records(data), v2=True))
    assert leftovers(pg_conn) == 0
    verify_clean(tmp_path, env, pg_dsn)


SWAP_NOW = """
import os, sys
from pgstream.db.connect import connect
from pgstream.loader import load_app
from pgstream.rebuild import Shadow, Swapper, select

dsn = sys.argv[1]
app = load_app("rebuildapp:app")
with connect(dsn, autocommit=True) as conn:
    shadow = Shadow.load(conn, select(app, []))
    for line in Swapper(shadow, conn, dsn).run().lines:
        print(line)
"""


def test_the_swap_finishes_a_long_gap_in_its_transaction(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """The catch-up is killed after 2 batches; the swap alone replays the rest (fold state
    and watermarks continued from the shadow's checkpoint) with the batch code."""
    env, data = _v2_job(tmp_path, pg_conn, pg_dsn, 600)
    crash = {**env, "PGSTREAM_CRASH_AT": "rebuild_after_batch", "PGSTREAM_CRASH_AFTER": "2"}
    done = rebuild(tmp_path, crash, pg_dsn, "--yes", check=False)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert 0 < _shadow_offset(pg_conn) < len(data) // 2
    (tmp_path / "swapnow.py").write_text(SWAP_NOW)
    out = subprocess.run(
        [sys.executable, "swapnow.py", pg_dsn],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 finished in the swap" in out.stdout, out.stdout
    assert_tables(pg_conn, reference(file_records(data), v2=True))
    assert dead_offsets(pg_conn) == failing(file_records(data))
    assert leftovers(pg_conn) == 0
    verify_clean(tmp_path, env, pg_dsn)


def _committed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT committed_offset FROM pgstream.partitions WHERE job = 'rebuildjob'"
    ).fetchone()
    return -1 if row is None or row[0] is None else int(row[0])


@pytest.mark.slow
def test_a_live_worker_runs_through_the_rebuild_and_the_swap(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, _ = setup(tmp_path, pg_conn, 0, REBUILDAPP_SOURCE="table", REBUILDAPP_BATCH="30")
    insert_events(pg_dsn, "events", 1500, users=9)
    run(tmp_path, env, pg_dsn)
    v2 = {**env, "REBUILDAPP_V2": "1"}
    run(tmp_path, v2, pg_dsn, "--accept-changes")
    writers = TableWriters(pg_dsn, "events", threads=3, users=9, hold=0.05, seed=7).start()
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgstream", "run", "rebuildapp:app", "--dsn", pg_dsn],
        cwd=tmp_path,
        env=v2,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        start = _committed(pg_conn)
        wait_for(lambda: _committed(pg_conn) > start, 60, what="the live worker to commit")
        out = rebuild(tmp_path, v2, pg_dsn, "--yes").stdout
        assert "swapped in" in out, out
        assert "leased by a live worker: fenced" in out, out
        after = _committed(pg_conn)
        wait_for(lambda: _committed(pg_conn) > after, 60, what="a commit after the swap")
        assert worker.poll() is None, "the live worker stopped"
        time.sleep(0.5)
    finally:
        writers.stop()
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    run(tmp_path, v2, pg_dsn)  # the rest of the input
    records = table_records(pg_conn, below=_committed(pg_conn))
    assert len(records) > 1500
    assert_tables(pg_conn, reference(records, v2=True))
    assert dead_offsets(pg_conn) == failing(records)
    assert leftovers(pg_conn) == 0
    cli(tmp_path, v2, "verify", "rebuildapp:app", "--dsn", pg_dsn)


def test_a_shadow_job_of_other_code_is_refused_until_restart(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _v2_job(tmp_path, pg_conn, pg_dsn, 500)
    crash = {**env, "PGSTREAM_CRASH_AT": "rebuild_after_batch", "PGSTREAM_CRASH_AFTER": "3"}
    done = rebuild(tmp_path, crash, pg_dsn, "--yes", check=False)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    # the job's code changes (a new sink) between the attempts
    v3 = {**env, "REBUILDAPP_TOPS": "1"}
    run(tmp_path, v3, pg_dsn, "--accept-changes")
    before = _snapshot(pg_conn)
    refused = rebuild(tmp_path, v3, pg_dsn, "--yes", check=False)
    assert refused.returncode == 1 and "--restart" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert _snapshot(pg_conn) == before
    dry = rebuild(tmp_path, v3, pg_dsn, "--restart").stdout
    assert "dropped (--restart)" in dry, dry
    out = rebuild(tmp_path, v3, pg_dsn, "--restart", "--yes").stdout
    assert "dropped the earlier rebuild" in out and "starting the rebuild" in out, out
    assert_tables(pg_conn, reference(file_records(data), v2=True), (*CORE, "tops"))
    assert leftovers(pg_conn) == 0
    verify_clean(tmp_path, v3, pg_dsn)

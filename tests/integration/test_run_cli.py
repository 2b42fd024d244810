"""``pgstream run`` as an operator sees it: what it prints, what ``ps`` shows, how it stops.

Real processes against the real server: the DSN's password never reaches a command line, the
start and progress lines are printed by default without Alembic's noise, and a second
SIGTERM stops a batch that is stuck in user code at once, losing nothing.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proctools import children_of, cli_env, run_cli, start_cli, wait_for
from psycopg.conninfo import conninfo_to_dict

APP = """
import os
import time
import pgstream as ps

app = ps.App("run-job")
orders = app.stream("orders", ps.FileSource(os.environ["ORDERS"]))
orders.map(lambda o: {"id": o["id"]}).to_table("ids")

STUCK_ID = int(os.environ.get("STUCK_ID", "-1"))
MARK = os.environ.get("STUCK_MARK", "")


@app.batch(orders)
def audit(batch: ps.Batch) -> None:
    batch.execute("INSERT INTO audit (n) VALUES (%s)", [len(batch.records)])
    if any(r["id"] == STUCK_ID for r in batch.records):
        with open(MARK, "w") as f:
            f.write(str(os.getpid()))
        if os.environ.get("STUCK_HOW") == "sql":
            batch.execute("SELECT pg_sleep(120)")
        else:
            time.sleep(120)
    time.sleep(float(os.environ.get("BATCH_SLEEP", "0")))
"""

N = 3000


def setup(tmp_path: Path, conn: psycopg.Connection[Any], n: int = N) -> dict[str, str]:
    (tmp_path / "app.py").write_text(APP)
    orders = tmp_path / "orders.jsonl"
    orders.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(n)))
    conn.execute(
        "CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint, _seq int,"
        " UNIQUE (_source, _partition, _offset, _seq));"
        "CREATE TABLE audit (n int)"
    )
    return cli_env(ORDERS=str(orders), PYTHONUNBUFFERED="1")


def password_dsn(dsn: str, password: str) -> str:
    p = conninfo_to_dict(dsn)
    return (
        f"postgresql://{p['user']}:{password}@{p.get('host', '127.0.0.1')}:"
        f"{p.get('port', 5432)}/{p['dbname']}"
    )


# -- item 6: no secret on a command line ----------------------------------------------------------


def test_workers_keep_the_password_off_every_command_line(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, procs: list[subprocess.Popen[str]]
) -> None:
    env = setup(tmp_path, pg_conn)
    env["BATCH_SLEEP"] = "0.05"  # keep the workers busy while we look
    dsn = password_dsn(pg_dsn, "s3cret")  # trust auth accepts any password
    args = ["--workers", "2", "--dsn", dsn, "--batch-size", "10"]
    parent = start_cli("run", "app:app", *args, cwd=tmp_path, env=env)
    procs.append(parent)
    kids: list[int] = wait_for(
        lambda: children_of(parent.pid) if len(children_of(parent.pid)) == 2 else [],
        30,
        what="two workers",
    )
    wait_for(
        lambda: pg_conn.execute("SELECT count(*) FROM ids").fetchone()[0] > 0, 30, what="progress"
    )
    for pid in [parent.pid, *kids]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline, (pid, cmdline)
    # the children got the DSN through their environment, not through --dsn
    for pid in kids:
        assert b"--dsn" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"PGSTREAM_DSN=" + dsn.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=60)
    assert parent.returncode == 0, err
    assert "s3cret" not in err


# -- item 11: start and progress lines by default, no Alembic noise ------------------------------


def test_run_prints_a_start_line_and_progress_without_alembic_noise(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    env = setup(tmp_path, pg_conn, n=1000)
    env["BATCH_SLEEP"] = "0.05"
    dsn = password_dsn(pg_dsn, "hunter2")
    args = ["--dsn", dsn, "--stop-when-idle", "--batch-size", "50", "--progress-interval", "0.2"]
    done = run_cli("run", "app:app", *args, "-v", cwd=tmp_path, env=env)
    err = done.stderr
    assert done.returncode == 0, err
    dbname = conninfo_to_dict(pg_dsn)["dbname"]
    assert (
        f'job "run-job": 1 stream, 1 partition; database "{dbname}" at 127.0.0.1:5432 '
        'as user "root"; 1 worker'
    ) in err, err
    progress = re.findall(
        r'job "run-job": [\d,]+ records \([\d,]+/s\), \d+ batch(?:es)?, 0 dead letters, '
        r"lag [\d,]+ on 1 partition",
        err,
    )
    assert progress, err
    assert "run-job: 1000 records in 20 batches (0 dead letters)" in err, err
    assert "alembic" not in err.lower(), err
    assert "hunter2" not in err

    # --progress-interval 0: the start and final lines only (and by default, no -v)
    pg_conn.execute("TRUNCATE ids")
    args = ["--dsn", pg_dsn, "--stop-when-idle", "--progress-interval", "0"]
    again = run_cli("run", "app:app", *args, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    lines = again.stderr.splitlines()
    assert len(lines) == 2 and 'job "run-job": 1 stream' in lines[0], again.stderr


# -- item 9: a second signal stops at once --------------------------------------------------------


@pytest.mark.parametrize(("how", "workers"), [("python", 1), ("sql", 1), ("sql", 2)])
def test_second_sigterm_stops_a_stuck_batch_at_once(
    tmp_path: Path,
    pg_dsn: str,
    pg_conn: Any,
    how: str,
    workers: int,
    procs: list[subprocess.Popen[str]],
) -> None:
    """A batch stuck in an ``@app.batch`` handler (Python sleep, or ``pg_sleep`` in its
    transaction): the first SIGTERM waits for it, the second stops at once (with
    ``--workers 2`` the supervisor passes it on); the batch rolls back, a re-run is exact."""
    env = setup(tmp_path, pg_conn)
    mark = tmp_path / "stuck"
    stuck = dict(env, STUCK_ID="1234", STUCK_MARK=str(mark), STUCK_HOW=how)
    args = ["--dsn", pg_dsn, "--batch-size", "500", "--workers", str(workers)]
    proc = start_cli("run", "app:app", *args, cwd=tmp_path, env=stuck)
    procs.append(proc)
    wait_for(mark.exists, 60, what="the batch to get stuck")

    proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)  # the first signal waits for the batch in flight
    second = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    kids = children_of(proc.pid)
    proc.wait(timeout=5)
    took = time.monotonic() - second
    _, err = proc.communicate()
    assert took < 1.5, f"the second SIGTERM took {took:.2f}s"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    if workers == 1:
        assert "received SIGTERM again: exiting now" in err, err
    else:
        assert "received SIGTERM again: stopping the workers at once" in err, err
        assert "[worker 1/2] WARNING pgstream.progress: the supervisor asked to stop at once: " \
            "exiting now" in err or "[worker 2/2] WARNING pgstream.progress: the supervisor " \
            "asked to stop at once: exiting now" in err, err
        assert not [pid for pid in kids if Path(f"/proc/{pid}").exists()], "workers left behind"

    # the stuck batch rolled back: nothing of it is visible, the ledger stops before it
    committed = pg_conn.execute(
        "SELECT max(end_offset) FROM pgstream.batches WHERE job = 'run-job'"
    ).fetchone()[0]
    stuck_at = (tmp_path / "orders.jsonl").read_bytes().index(b'{"id": 1234}')
    assert committed is None or committed <= stuck_at
    (top,) = pg_conn.execute("SELECT max(id) FROM ids").fetchone()
    assert top is None or top < 1234
    assert pg_conn.execute("SELECT count(*) FROM ids").fetchone() == (
        pg_conn.execute("SELECT coalesce(sum(n), 0) FROM audit").fetchone()
    )
    # a clean run finishes exactly (the dead session's lease is taken over)
    done = run_cli("run", "app:app", "--dsn", pg_dsn, "--stop-when-idle", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert pg_conn.execute("SELECT count(*), count(DISTINCT id) FROM ids").fetchone() == (N, N)
    assert pg_conn.execute("SELECT sum(n) FROM audit").fetchone() == (N,)
    ranges = pg_conn.execute(
        "SELECT start_offset, end_offset FROM pgstream.batches WHERE job = 'run-job' "
        "ORDER BY start_offset"
    ).fetchall()
    assert ranges[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), ranges

"""``pgstream run --workers N`` supervises its workers (issue 11 item 7), with real processes.

* A SIGKILLed worker is restarted (a new child appears, the death is logged with the worker's
  number, pid and signal) and the job still finishes exactly; a later SIGTERM to the
  supervisor stops every worker and exits 0 (it used to exit 247 after a child's SIGKILL).
* A worker that fails with a configuration error (exit 2) stops the group with exit 2.
* A worker that dies right after its start again and again stops the group instead of looping.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Job, WorkerProc, insert_events, wait_for
from proctools import children_of


def _if_count(pids: list[int], n: int) -> list[int]:
    """``pids`` when there are exactly ``n`` of them, else none (for :func:`wait_for`)."""
    return pids if len(pids) == n else []


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_job_finishes_exactly(
    pg_dsn: str, tmp_path: Path
) -> None:
    job = Job(pg_dsn, tmp_path, tables=["events", "more"], batch=100).setup()
    insert_events(pg_dsn, "events", 20_000, seed=1)
    insert_events(pg_dsn, "more", 20_000, seed=2)
    parent = job.start(args=["--workers", "2"])
    seen: list[int] = []
    try:
        kids = wait_for(
            lambda: _if_count(children_of(parent.pid), 2),
            30, what="two workers",
        )
        seen += kids

        def owner_pid() -> int | None:
            owners = [p["owner"] for p in job.partitions().values() if p["owner"]]
            return next((k for k in kids if any(f":{k}:" in o for o in owners)), None)

        victim = wait_for(owner_pid, 30, what="a worker to claim a partition")
        assert victim is not None  # wait_for returns only a truthy value
        before = job.total_batches()
        wait_for(lambda: job.total_batches() > before, 30, what="a commit")
        os.kill(victim, signal.SIGKILL)
        new = wait_for(
            lambda: [p for p in children_of(parent.pid) if p not in kids], 30,
            what="a restarted worker",
        )
        seen += new
        wait_for(job.caught_up, 180, interval=0.2, what="the job to catch up")
        assert parent.alive(), parent.output()[-3000:]
        rc = parent.terminate(timeout=60)
        out = parent.output()
        assert rc == 0, f"exit {rc}:\n{out[-3000:]}"
        assert not [pid for pid in seen if alive(pid)], "workers left behind"
        assert re.search(
            rf"worker [12] \(pid {victim}\) was killed by SIGKILL; restarting in 1\.0s", out
        ), out[-3000:]
        assert "[worker 1/2]" in out and "[worker 2/2]" in out, out[-3000:]
        job.assert_outputs_exact()
        job.assert_verify_clean()
    finally:
        kill_all(seen)
        job.cleanup()


APP = """
import os
import pgstream as ps

if os.environ.get("BREAK_WORKER", "-") == os.environ.get("PGSTREAM_WORKER"):
    raise KeyError("missing")
app = ps.App("sup-job")
orders = app.stream("orders", ps.FileSource(os.environ["ORDERS"]))
orders.map(lambda o: {"id": o["id"]}).to_table(os.environ.get("SINK", "ids"))
"""


def run_group(tmp_path: Path, pg_dsn: str, **env: str) -> tuple[WorkerProc, list[int]]:
    (tmp_path / "app.py").write_text(APP)
    orders = tmp_path / "orders.jsonl"
    orders.write_text("".join(f'{{"id": {i}}}\n' for i in range(100)))
    full = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    full.update(ORDERS=str(orders), PYTHONUNBUFFERED="1", **env)
    log = tmp_path / "group.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgstream", "run", "app:app", "--dsn", pg_dsn, "--workers", "2"],
            cwd=tmp_path, env=full, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProc(proc, log, time.monotonic()), []


def test_a_configuration_error_in_a_worker_stops_the_group(
    pg_dsn: str, pg_conn: object, tmp_path: Path
) -> None:
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint,"
            " _seq int, UNIQUE (_source, _partition, _offset, _seq))"
        )
    group, _ = run_group(tmp_path, pg_dsn, BREAK_WORKER="2/2")
    try:
        rc = group.wait(60)
    finally:
        group.kill()
    out = group.output()
    assert rc == 2, out
    assert re.search(
        r"worker 2 \(pid \d+\) stopped with a configuration error \(exit code 2\): "
        r"stopping all workers",
        out,
    ), out
    assert "importing 'app' failed: KeyError" in out, out


@pytest.mark.slow
def test_a_worker_dying_at_start_again_and_again_stops_the_group(
    pg_dsn: str, tmp_path: Path
) -> None:
    # the sink table is missing: every worker fails its start-up check with exit 1
    group, _ = run_group(tmp_path, pg_dsn, SINK="nowhere")
    try:
        rc = group.wait(120)
    finally:
        group.kill()
    out = group.output()
    assert rc == 1, out
    assert re.search(
        r"worker [12] \(pid \d+\) exited with code 1; it died 5 times in a row within 10s of "
        r"its start: stopping all workers",
        out,
    ), out
    assert "restarting in 1.0s" in out and "restarting in 8.0s" in out, out
    assert out.count("nowhere") >= 5, out


def test_sigterm_to_the_whole_group_is_one_clean_stop(pg_dsn: str, tmp_path: Path) -> None:
    """A service manager (systemd's default ``KillMode=control-group``) signals the supervisor
    and every worker: that is one stop request, not two. Every worker finishes its batch in
    flight, the group exits 0 and the job then finishes exactly."""
    job = Job(pg_dsn, tmp_path, tables=["events", "more"], batch=100).setup()
    insert_events(pg_dsn, "events", 20_000, seed=3)
    insert_events(pg_dsn, "more", 20_000, seed=4)
    parent = job.start(args=["--workers", "2"])
    kids: list[int] = []
    try:
        kids = wait_for(
            lambda: _if_count(children_of(parent.pid), 2),
            30, what="two workers",
        )
        wait_for(lambda: len([p for p in job.partitions().values() if p["owner"]]) == 2, 30,
                 what="both partitions claimed")
        before = job.total_batches()
        wait_for(lambda: job.total_batches() > before, 30, what="a commit")
        time.sleep(max(0.0, parent.started + 3.0 - time.monotonic()))  # all past start-up
        # the workers first, the supervisor a moment later: each worker has surely handled
        # its own SIGTERM before the supervisor passes the stop on
        for pid in kids:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(parent.pid, signal.SIGTERM)
        rc = parent.wait(60)
        out = parent.output()
        assert rc == 0, f"exit {rc}:\n{out[-3000:]}"
        assert "exiting now" not in out, out[-3000:]
        assert not [pid for pid in kids if alive(pid)], "workers left behind"
        job.run_to_idle()
        job.assert_outputs_exact()
        job.assert_verify_clean()
    finally:
        kill_all(kids)
        job.cleanup()

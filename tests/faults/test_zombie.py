"""Zombies and takeovers (issue 3 part 5, issue 2 part 2).

* A worker frozen (SIGSTOP) in the middle of a batch past its lease is replaced by a second
  worker (bumped epoch) that waited for the lease to expire, because the frozen worker's
  session is alive; resumed, the zombie's COMMIT is rejected by the epoch compare-and-set
  and it carries on cleanly without the partition.
* After ``kill -9`` of the owner its session is provably gone: a new ``run`` takes over at
  once, without sitting out the (10 s) lease.
* A worker whose clock is a day off: leases are timed by the database clock, so its lease
  is as long as anyone's and nobody steals its partition.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from pathlib import Path

import pytest
from harness import Job, WorkerProc, faketime_env, insert_events, wait_for

FREEZE_ID = 275


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _ledger(job: Job) -> list[tuple[int, int, int]]:
    return [
        (int(r[0]), int(r[1]), int(r[2]))
        for r in job.query(
            "SELECT start_offset, end_offset, epoch FROM pgstream.batches "
            "WHERE source = 'events' ORDER BY start_offset"
        )
    ]


def _finish(job: Job, *workers: WorkerProc) -> None:
    for w in workers:
        if w.alive():
            assert w.terminate() == 0, w.output()[-3000:]
    job.run_to_idle()
    assert job.caught_up()
    job.assert_outputs_exact()
    job.assert_verify_clean()


def test_frozen_owner_is_fenced_by_epoch(pg_dsn: str, tmp_path: Path) -> None:
    lease = 2.0
    mark = tmp_path / "frozen.pid"
    job = Job(
        pg_dsn, tmp_path, lease=lease, batch=50,
        extra_env={"FAULTAPP_FREEZE_ID": str(FREEZE_ID), "FAULTAPP_FREEZE_MARK": str(mark)},
    ).setup()
    try:
        insert_events(pg_dsn, "events", 600, seed=3)
        a = job.start()
        wait_for(mark.exists, 30, what="worker A to freeze itself mid-batch")
        wait_for(lambda: _state(a.pid) == "T", 5, what="SIGSTOP to take effect")
        a.stopped = True
        sessions = job.query(
            "SELECT state, wait_event, left(query, 50) FROM pg_stat_activity "
            "WHERE application_name = %s", [f"pgstream:faults:{a.pid}"],
        )
        in_txn = any(st and "transaction" in st for st, *_ in sessions)
        frozen = job.partitions()[("events", "0")]
        assert frozen["committed"] is not None and frozen["committed"] <= FREEZE_ID
        a_epoch, a_expiry = frozen["epoch"], frozen["lease_expires_at"]

        b = job.start()
        started = time.monotonic()
        taken = wait_for(
            lambda: (p := job.partitions()[("events", "0")])["epoch"] > a_epoch and p,
            lease + 15, what=f"worker B to take over (A's sessions when frozen: {sessions})",
        )
        waited = time.monotonic() - started
        claimed_at = taken["lease_expires_at"] - dt.timedelta(seconds=lease)
        # A's session is alive (frozen, not dead): B had to wait for the lease to expire
        assert claimed_at >= a_expiry, f"B claimed at {claimed_at}, before A's lease {a_expiry}"
        assert job.owned_by(b) == [("events", "0")]
        wait_for(job.caught_up, 30, what="B to catch up")

        a.cont()
        # A resumes mid-batch. If it froze before its batch transaction, the epoch CAS refuses
        # the batch ("epoch N is stale"); if it froze inside it, the server ended the idle
        # session after the lease, so A reconnects and the CAS of its retry is refused, or it
        # reads the partition row after an unknown COMMIT and finds it taken over.
        fenced = wait_for(
            lambda: next((m for m in ("is stale", "taken over during an unknown commit")
                          if m in a.output()), None),
            20, what="A's batch to be refused by the epoch check",
        )
        time.sleep(0.5)
        assert a.alive(), f"A crashed instead of stepping aside:\n{a.output()[-3000:]}"
        assert job.owned_by(b) == [("events", "0")], "the zombie got the partition back"

        ledger = _ledger(job)
        assert all(end <= FREEZE_ID for _s, end, e in ledger if e == a_epoch), ledger
        assert [e for *_x, e in ledger] == sorted(e for *_x, e in ledger)
        print(f"\nzombie: B took over after {waited:.2f}s (lease {lease}s, A frozen "
              f"{'inside' if in_txn else 'outside'} its batch transaction: {sessions}); "
              f"A's batch refused: {fenced!r} (epoch {a_epoch} < {taken['epoch']})")
        _finish(job, a, b)
    finally:
        job.cleanup()


STUCK_OWNER = """
import os, signal, sys
import psycopg

c = psycopg.connect(sys.argv[1], autocommit=True, application_name="pgstream:faults:stuck")
key = "job = 'faults' AND source = 'events' AND partition = '0'"
c.execute("UPDATE pgstream.partitions SET epoch = epoch + 1, owner = 'stuck', "
          "owner_backend_pid = pg_backend_pid(), owner_backend_start = (SELECT backend_start "
          "FROM pg_stat_activity WHERE pid = pg_backend_pid()), "
          "lease_expires_at = now() + interval '1 second' WHERE " + key)
c.execute("BEGIN")
c.execute("UPDATE pgstream.partitions SET records = records WHERE " + key)
with c.cursor().copy("COPY event_facts FROM STDIN"):
    print("frozen in COPY", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_owner_frozen_in_copy_is_terminated(pg_dsn: str, tmp_path: Path) -> None:
    """An owner frozen in a COPY (the server waits for its data; no timeout ends that) holds
    the partition row: the next claimer ends its session once the lease has expired."""
    import subprocess
    import sys

    job = Job(pg_dsn, tmp_path, lease=1.0, batch=50).setup()
    stuck = None
    try:
        insert_events(pg_dsn, "events", 100, seed=9)
        job.run_to_idle()
        insert_events(pg_dsn, "events", 100, seed=10)
        stuck = subprocess.Popen([sys.executable, "-c", STUCK_OWNER, pg_dsn],
                                 stdout=subprocess.PIPE)
        assert stuck.stdout is not None and b"frozen" in stuck.stdout.readline()
        wait_for(lambda: _state(stuck.pid) == "T", 5, what="the owner to freeze")
        state = job.query("SELECT state, wait_event FROM pg_stat_activity "
                          "WHERE application_name = 'pgstream:faults:stuck'")
        assert state == [("active", "ClientRead")], state

        b = job.start()
        wait_for(lambda: job.owned_by(b), 20, what="B to take over from the frozen owner")
        assert "terminated it" in b.output()
        wait_for(job.caught_up, 30, what="B to catch up")
        _finish(job, b)
    finally:
        if stuck is not None:
            stuck.kill()
            stuck.wait()
        job.cleanup()


def test_takeover_after_kill9_is_immediate(pg_dsn: str, tmp_path: Path) -> None:
    job = Job(pg_dsn, tmp_path, lease=10.0, batch=50).setup()
    try:
        insert_events(pg_dsn, "events", 300, seed=4)
        a = job.start()
        wait_for(lambda: job.owned_by(a) and job.caught_up(), 30, what="A to catch up")
        insert_events(pg_dsn, "events", 300, seed=5)
        killed = time.monotonic()
        assert a.kill() == -signal.SIGKILL
        b = job.start()
        wait_for(lambda: job.owned_by(b), 10, interval=0.02, what="B to take over")
        took = time.monotonic() - killed
        # includes B's interpreter start-up; the 10 s lease was not sat out
        assert took < 3.0, f"takeover after kill -9 took {took:.2f}s"
        print(f"\ntakeover after kill -9: {took:.2f}s from the kill (lease 10s)")
        wait_for(job.caught_up, 30, what="B to catch up")
        _finish(job, b)
    finally:
        job.cleanup()


@pytest.mark.skipif(faketime_env("-1d") is None, reason="needs libfaketime (apt faketime)")
def test_worker_with_wrong_clock(pg_dsn: str, tmp_path: Path) -> None:
    lease = 2.0
    job = Job(pg_dsn, tmp_path, lease=lease, batch=50).setup()
    try:
        insert_events(pg_dsn, "events", 200, seed=6)
        # A believes it is yesterday: a lease computed from its clock would look expired to
        # everyone, one computed by the database is as long as anyone's
        a = job.start(env=faketime_env("-1d"))
        wait_for(lambda: job.owned_by(a), 30, what="A (clock -1 day) to claim")
        p = job.partitions()[("events", "0")]
        line = next(ln for ln in a.output().splitlines() if "claimed events/0" in ln)
        a_clock = dt.datetime.fromisoformat(line[:19]).replace(tzinfo=dt.timezone.utc)
        skew = (a_clock - p["now"]).total_seconds()
        assert skew < -23 * 3600, f"A's clock is not a day behind (skew {skew:.0f}s)"
        left = (p["lease_expires_at"] - p["now"]).total_seconds()
        assert 0 < left <= lease + 0.5, f"lease ends {left:.1f}s from the database's now"
        epoch = p["epoch"]

        b = job.start()
        insert_events(pg_dsn, "events", 200, seed=7)
        deadline = time.monotonic() + 3 * lease
        while time.monotonic() < deadline:  # A renews by the database clock: B never steals
            assert job.owned_by(a) == [("events", "0")]
            assert job.partitions()[("events", "0")]["epoch"] == epoch
            time.sleep(0.2)
        wait_for(job.caught_up, 30, what="A to catch up")

        assert a.kill() == -signal.SIGKILL
        wait_for(lambda: job.owned_by(b), 10, what="B to take over from the dead A")
        insert_events(pg_dsn, "events", 100, seed=8)
        wait_for(job.caught_up, 30, what="B to catch up")
        _finish(job, b)
    finally:
        job.cleanup()

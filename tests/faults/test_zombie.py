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
        frozen = job.partitions()[("events", "0")]
        assert frozen["committed"] is not None and frozen["committed"] <= FREEZE_ID
        a_epoch, a_expiry = frozen["epoch"], frozen["lease_expires_at"]

        b = job.start()
        started = time.monotonic()
        taken = wait_for(
            lambda: (p := job.partitions()[("events", "0")])["epoch"] > a_epoch and p,
            lease + 15, what="worker B to take over",
        )
        waited = time.monotonic() - started
        claimed_at = taken["lease_expires_at"] - dt.timedelta(seconds=lease)
        # A's session is alive (frozen, not dead): B had to wait for the lease to expire
        assert claimed_at >= a_expiry, f"B claimed at {claimed_at}, before A's lease {a_expiry}"
        assert job.owned_by(b) == [("events", "0")]
        wait_for(job.caught_up, 30, what="B to catch up")

        a.cont()
        wait_for(lambda: "is stale" in a.output(), 20,
                 what="A's commit to be rejected by the epoch check")
        time.sleep(0.5)
        assert a.alive(), f"A crashed instead of stepping aside:\n{a.output()[-3000:]}"
        assert job.owned_by(b) == [("events", "0")], "the zombie got the partition back"

        ledger = _ledger(job)
        assert all(end <= FREEZE_ID for _s, end, e in ledger if e == a_epoch), ledger
        assert [e for *_x, e in ledger] == sorted(e for *_x, e in ledger)
        print(f"\nzombie: B took over after {waited:.2f}s (lease {lease}s, A frozen); "
              f"A's commit rejected (epoch {a_epoch} < {taken['epoch']})")
        _finish(job, a, b)
    finally:
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

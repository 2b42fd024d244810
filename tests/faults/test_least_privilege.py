"""Faults under least privilege (issue 11 item 13): workers run as a non-superuser runtime
role with only the documented grants (README "Permissions"), from the ``pg_roles`` fixture.

* SIGKILL the worker again and again while writers (another role: the superuser, whose
  sessions the runtime role sees only partly in pg_stat_activity) insert out of id order; a
  final ``run --stop-when-idle`` leaves every sink equal to the reference, ``verify`` clean.
* Takeover of an owner frozen inside its batch transaction: a worker of the same role ends
  the frozen session itself (PostgreSQL lets a role signal its own sessions: no
  pg_signal_backend). An owner running as *another* role cannot be ended without
  pg_signal_backend and pg_read_all_stats: the claim then waits until that session ends.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Job, TableWriters, WorkerProc, insert_events, wait_for
from test_zombie import STUCK_OWNER, _finish, _state

KILLS = int(os.environ.get("PGSTREAM_CRASH_KILLS_PRIV", "5"))

GRANTS = (
    "GRANT SELECT ON public.events TO {rt}",
    "GRANT SELECT, INSERT ON public.event_facts TO {rt}",
    "GRANT SELECT, INSERT, UPDATE ON public.events_totals, public.events_fold TO {rt}",
)


def _job(roles: Any, tmp_path: Path, **kwargs: Any) -> Job:
    job = Job(roles.owner_dsn, tmp_path, run_dsn=roles.runtime_dsn, **kwargs).setup()
    roles.grant(*GRANTS)
    return job


@pytest.mark.slow
def test_crash_loop_as_runtime_role(pg_roles: Any, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("PGSTREAM_CRASH_SEED", "0")) or None)
    job = _job(pg_roles, tmp_path, batch=100)
    writers = TableWriters(pg_roles.owner_dsn, "events", threads=3, seed=rng.random()).start()
    kills = 0
    try:
        for _ in range(KILLS):
            w = job.start()
            before = job.total_batches()

            def committed(b: int = before, w: WorkerProc = w) -> bool:
                return job.total_batches() > b or not w.alive()

            wait_for(
                committed,
                30,
                what="a commit by the runtime role's worker",
            )
            assert w.alive(), f"worker died:\n{w.output()[-3000:]}"
            time.sleep(rng.random() * 0.6)
            assert w.kill() == -signal.SIGKILL
            kills += 1
    finally:
        writers.stop()
        job.cleanup()
    try:
        job.run_to_idle()
        assert job.caught_up(), f"not caught up: {job.partitions()} vs {job.heads()}"
        ref = job.assert_outputs_exact()
        job.assert_verify_clean()
    finally:
        job.cleanup()
    owners = {r[0] for r in job.query("SELECT DISTINCT worker FROM pgstream.batches")}
    assert len(owners) >= 2, owners
    print(
        f"\nleast-privilege crash loop: {kills} SIGKILLs of role {pg_roles.runtime}'s worker, "
        f"{writers.committed} rows committed by another role ({writers.rolled_back} rolled "
        f"back), {len(ref.event_facts)} append rows exact, verify clean"
    )


def _stuck_owner(dsn: str) -> subprocess.Popen[bytes]:
    """An owner frozen (SIGSTOP) inside its batch transaction, in a COPY into a sink."""
    stuck = subprocess.Popen([sys.executable, "-c", STUCK_OWNER, dsn], stdout=subprocess.PIPE)
    assert stuck.stdout is not None and b"frozen" in stuck.stdout.readline()
    wait_for(lambda: _state(stuck.pid) == "T", 5, what="the owner to freeze")
    return stuck


def test_frozen_owner_of_same_role_is_ended_without_pg_signal_backend(
    pg_roles: Any, tmp_path: Path
) -> None:
    job = _job(pg_roles, tmp_path, lease=1.0, batch=50)
    stuck = None
    try:
        insert_events(pg_roles.owner_dsn, "events", 100, seed=9)
        job.run_to_idle()
        insert_events(pg_roles.owner_dsn, "events", 100, seed=10)
        stuck = _stuck_owner(pg_roles.runtime_dsn)
        assert job.query(
            "SELECT pg_has_role(%s, 'pg_signal_backend', 'MEMBER')", [pg_roles.runtime]
        ) == [(False,)]
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


def _claim_waits(job: Job, b: Any) -> bool:
    rows = job.query(
        "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = %s",
        [f"pgstream:faults:{b.pid}"],
    )
    return any(r[0] == "Lock" for r in rows)


def test_frozen_owner_of_other_role_needs_signal_grants(pg_roles: Any, tmp_path: Path) -> None:
    """Another role's frozen owner: without pg_signal_backend + pg_read_all_stats the claim
    waits (nothing is lost) until that session ends; with them it is ended at once."""
    job = _job(pg_roles, tmp_path, lease=1.0, batch=50)
    # the other role: the migrator (owns pgstream's tables) with what the stuck COPY needs
    pg_roles.grant("GRANT INSERT ON public.event_facts TO {mig}")
    stuck = None
    try:
        insert_events(pg_roles.owner_dsn, "events", 100, seed=9)
        job.run_to_idle()
        insert_events(pg_roles.owner_dsn, "events", 100, seed=10)

        stuck = _stuck_owner(pg_roles.migrator_dsn)
        b = job.start()
        wait_for(lambda: _claim_waits(job, b), 20, what="B's claim to wait for the row lock")
        time.sleep(2.0)  # the lease (1 s) has long expired: B still cannot end the session
        assert not job.owned_by(b) and "terminated it" not in b.output()
        stuck.kill()  # the frozen session ends (its client is gone): B's claim goes through
        stuck.wait()
        stuck = None
        wait_for(lambda: job.owned_by(b), 20, what="B to take over once the session ended")
        wait_for(job.caught_up, 30, what="B to catch up")
        assert b.terminate() == 0

        pg_roles.grant("GRANT pg_signal_backend, pg_read_all_stats TO {rt}")
        insert_events(pg_roles.owner_dsn, "events", 100, seed=11)
        stuck = _stuck_owner(pg_roles.migrator_dsn)
        c = job.start()
        wait_for(lambda: job.owned_by(c), 20, what="C to end the other role's frozen owner")
        assert "terminated it" in c.output()
        wait_for(job.caught_up, 30, what="C to catch up")
        _finish(job, c)
    finally:
        if stuck is not None:
            stuck.kill()
            stuck.wait()
        job.cleanup()

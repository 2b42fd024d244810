"""Faults inside pushed-down batches (issue 8): ``pushapp`` runs every table path as one
``INSERT ... SELECT`` per sink. SIGKILL at each step of the batch transaction leaves exactly
the committed batches visible and ``verify`` clean; out-of-order writers lose nothing; every
sink equals a reference computed from the table in Python."""

from __future__ import annotations

import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from harness import Job, TableWriters, insert_events, wait_for

from pgstream.runtime.crashpoints import POINTS

BATCH = 50


def push_job(dsn: str, tmp_path: Path, **kwargs: Any) -> Job:
    return Job(dsn, tmp_path, target="pushapp:app", **kwargs).setup()


def assert_exact(job: Job) -> None:
    """event_facts and every ``<table>_totals`` equal what the events say."""
    inputs = job.inputs()
    act = job.actual()
    want_facts = sorted(
        (t, "0", i, 0, i, u, a * 100)
        for t, rows in inputs.events.items()
        for i, u, a in rows
        if a != 0
    )
    got_facts = sorted(tuple(r) for r in act.event_facts)
    assert got_facts == want_facts, f"{len(got_facts)} facts, want {len(want_facts)}"
    for t, rows in inputs.events.items():
        per_user: dict[int, list[int]] = {}
        for _, u, a in rows:
            if a != 0:
                per_user.setdefault(u, []).append(a)
        got = act.totals[t]
        assert sorted(got) == sorted(per_user)
        for u, amounts in per_user.items():
            n, total, lo, hi, mean, msum, mcount = got[u]
            assert (n, total, lo, hi, msum, mcount) == (
                len(amounts), sum(amounts), min(amounts), max(amounts), sum(amounts),
                len(amounts),
            ), u
            assert abs(Decimal(mean) - Decimal(sum(amounts)) / len(amounts)) < Decimal("1e-9")
    assert not act.dead


@pytest.mark.parametrize("point", POINTS)
def test_crash_point_inside_a_pushed_down_batch(point: str, pg_dsn: str, tmp_path: Path) -> None:
    job = push_job(pg_dsn, tmp_path, batch=BATCH)
    try:
        insert_events(pg_dsn, "events", 400, seed=7)
        crashed = job.start(
            stop_when_idle=True,
            env={"PGSTREAM_CRASH_AT": point, "PGSTREAM_CRASH_AFTER": "3"},
        )
        rc = crashed.wait(60)
        assert rc == -signal.SIGKILL, f"expected a SIGKILL at {point}, got {rc}:\n" + (
            crashed.output()[-2000:]
        )
        assert "runs in SQL (pushed down)" in crashed.output()
        landed = 3 if point == "after_commit" else 2
        assert job.total_batches() == landed
        committed = job.partitions()[("events", "0")]["committed"]
        # only whole batches are visible: nothing of the sinks above the committed offset
        above = job.query("SELECT count(*) FROM event_facts WHERE _offset >= %s", [committed])
        assert above == [(0,)]
        job.assert_verify_clean()

        job.run_to_idle()
        assert job.caught_up()
        assert_exact(job)
        assert "clean" in job.assert_verify_clean()
    finally:
        job.cleanup()


def test_out_of_order_writers_with_pushdown(pg_dsn: str, tmp_path: Path) -> None:
    job = push_job(pg_dsn, tmp_path, batch=100, lease=3.0)
    writers = TableWriters(pg_dsn, "events", threads=3, seed=21)
    try:
        insert_events(pg_dsn, "events", 300, seed=3)
        writers.start()
        worker = job.start()
        wait_for(lambda: job.total_batches() >= 10, 60, what="batches")
        worker.kill()  # SIGKILL mid-run, writers still going
        assert "runs in SQL (pushed down)" in worker.output()
        again = job.start()
        time.sleep(2.0)
        writers.stop()
        assert writers.committed > 0 and writers.rolled_back >= 0
        assert again.terminate() == 0, again.output()[-3000:]
        job.run_to_idle()
        assert job.caught_up()
        assert_exact(job)
        job.assert_verify_clean()
    finally:
        writers._stop.set()
        job.cleanup()

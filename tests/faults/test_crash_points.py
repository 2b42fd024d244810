"""Named crash points (issue 3 part 2): SIGKILL the worker at each step of the batch.

``PGSTREAM_CRASH_AT=<point> PGSTREAM_CRASH_AFTER=3`` kills ``pgstream run`` the third time
it reaches the point. Whatever the point, exactly the batches whose COMMIT returned are
visible (2 before the COMMIT of the third batch, 3 after it), ``verify`` is clean right
after the crash, and a restart finishes the job with every output exactly once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from harness import Job, insert_events, write_clicks

from pgstream.runtime.crashpoints import POINTS

BATCH = 50


@pytest.mark.parametrize("point", POINTS)
def test_crash_point(point: str, pg_dsn: str, tmp_path: Path) -> None:
    job = Job(pg_dsn, tmp_path, with_file=True, batch=BATCH).setup()
    try:
        insert_events(pg_dsn, "events", 400, seed=7)
        write_clicks(job.file, 300, seed=8)

        crashed = job.start(
            stop_when_idle=True,
            env={"PGSTREAM_CRASH_AT": point, "PGSTREAM_CRASH_AFTER": "3"},
        )
        rc = crashed.wait(60)
        assert rc == -signal.SIGKILL, f"expected a SIGKILL at {point}, got {rc}:\n" + (
            crashed.output()[-2000:]
        )

        ledger = job.query("SELECT count(*) FROM pgstream.batches WHERE job = %s", ["faults"])
        landed = 3 if point == "after_commit" else 2
        assert ledger[0][0] == landed, f"{point}: {ledger[0][0]} batches landed, not {landed}"
        parts = job.partitions()
        assert sum(p["batches"] for p in parts.values()) == landed
        # only whole batches are visible: the audit of the crashed state is clean
        job.assert_verify_clean()

        job.run_to_idle()
        assert job.caught_up()
        job.assert_outputs_exact()
        out = job.assert_verify_clean()
        assert "clean" in out
    finally:
        job.cleanup()

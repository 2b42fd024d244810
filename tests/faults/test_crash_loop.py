"""Crash loop (issue 2 part 7): SIGKILL ``pgstream run`` again and again while writers insert
into a TableSource table out of id order (transactions held open, some rolled back) and a
FileSource file grows (partial lines included); then a final ``run --stop-when-idle``.

Every sink (append, aggregate with avg, order-sensitive fold) and the dead letters equal a
reference computed from the inputs alone, and ``pgstream verify`` is clean.
``PGSTREAM_CRASH_KILLS`` sets the number of kills (default 10).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from harness import FileWriter, Job, TableWriters, WorkerProc, wait_for

KILLS = int(os.environ.get("PGSTREAM_CRASH_KILLS", "10"))


@pytest.mark.slow
def test_crash_loop_outputs_exact(pg_dsn: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("PGSTREAM_CRASH_SEED", "0")) or None)
    job = Job(pg_dsn, tmp_path, with_file=True, batch=100).setup()
    writers = TableWriters(pg_dsn, "events", threads=3, seed=rng.random()).start()
    files = FileWriter(job.file, rate=150, seed=rng.random()).start()
    kills = 0
    mid_batch = 0
    try:
        for _ in range(KILLS):
            w = job.start()
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.8)  # sometimes during start-up
            else:
                before = job.total_batches()

                def claimed(w: WorkerProc = w) -> bool:
                    return len(job.owned_by(w)) == 2 or not w.alive()

                wait_for(claimed, 20, what="the worker to claim both partitions")
                assert w.alive(), f"worker died:\n{w.output()[-3000:]}"
                # let it commit at least once, then kill it at a random moment

                def committed(b: int = before) -> bool:
                    return job.total_batches() > b

                wait_for(committed, 20, what="a commit")
                time.sleep(rng.random() * 0.6)
            assert w.alive(), f"worker exited on its own:\n{w.output()[-3000:]}"
            mid_batch += any(p["attempts"] for p in job.partitions().values())
            assert w.kill() == -signal.SIGKILL
            kills += 1
    finally:
        writers.stop()
        files.stop()
        job.cleanup()
    try:
        job.run_to_idle()
        assert job.caught_up(), f"not caught up: {job.partitions()} vs {job.heads()}"
        ref = job.assert_outputs_exact()
        job.assert_verify_clean()
    finally:
        job.cleanup()
    rows = sum(1 for _ in job.inputs().events["events"])
    print(
        f"\ncrash loop: survived {kills} SIGKILLs ({mid_batch} with a batch in flight); "
        f"{rows} table rows ({writers.rolled_back} rolled back), {files.lines} file lines, "
        f"{len(ref.event_facts)} + {len(ref.click_facts)} append rows, {len(ref.dead)} dead "
        "letters, lost=0 duplicated=0"
    )
    assert kills == KILLS
    assert rows > 0 and files.lines > 0

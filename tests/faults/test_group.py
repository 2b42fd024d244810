"""Worker groups that rebalance (issue 12, part 4): real ``pgstream run`` processes share a
split table's partitions while out-of-order writers keep adding rows. The group goes from 1
to 3 to 2 workers; after each change every partition is owned by exactly one live worker and
the shares are even within a few seconds, the hand-over is cooperative (no owner is fenced),
no offset range is committed twice, and at the end every sink equals the reference and
``pgstream verify`` is clean."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from harness import Job, TableWriters, WorkerProc, insert_events, wait_for

from pgstream.runtime.leases import share_of

PARTS = 6
#: seconds a change of the group may take until every partition has its one live owner
SETTLE = 15.0


def even_ownership(job: Job, workers: list[WorkerProc]) -> Counter[int] | None:
    """Partition counts per worker (by pid) when every partition has exactly one owner among
    ``workers`` with a live lease and the counts are the fair shares; else None."""
    parts = job.partitions()
    if len(parts) != PARTS:
        return None
    pids = {w.pid for w in workers}
    counts: Counter[int] = Counter()
    for p in parts.values():
        owner = p["owner"]
        if owner is None or p["lease_expires_at"] is None or p["lease_expires_at"] <= p["now"]:
            return None
        pid = int(owner.split(":")[-2])
        if pid not in pids:
            return None
        counts[pid] += 1
    shares = sorted((share_of(PARTS, len(workers), r) for r in range(len(workers))), reverse=True)
    return counts if sorted(counts.values(), reverse=True) == shares else None


def settle(job: Job, workers: list[WorkerProc], what: str) -> float:
    """Wait until ownership is even over ``workers``; the seconds it took."""
    started = time.monotonic()
    wait_for(lambda: even_ownership(job, workers), SETTLE, interval=0.02, what=what)
    return time.monotonic() - started


def assert_ledger_tiles(job: Job) -> int:
    """Per partition, the committed batches follow each other with no range twice; their
    number."""
    rows = job.query(
        "SELECT source, partition, start_offset, end_offset FROM pgstream.batches "
        "WHERE job = 'faults' ORDER BY source, partition, start_offset"
    )
    ranges = Counter((s, p, a, b) for s, p, a, b in rows)
    assert max(ranges.values()) == 1, f"a range committed twice: {ranges.most_common(3)}"
    last: dict[tuple[str, str], int] = {}
    for s, p, a, b in rows:
        assert last.get((s, p), a) == a, f"{s}/{p}: batch {a}..{b} after one ending {last}"
        last[(s, p)] = b
    return len(rows)


@pytest.mark.slow
def test_group_rebalances_1_to_3_to_2_cooperatively_and_exactly(
    pg_dsn: str, tmp_path: Path
) -> None:
    job = Job(pg_dsn, tmp_path, lease=10.0, batch=50, split=PARTS).setup()
    writers = TableWriters(pg_dsn, "events", threads=3, users=60, seed=21)
    try:
        insert_events(pg_dsn, "events", 3000, users=60, seed=8)
        writers.start()
        a = job.start()
        settle(job, [a], "one worker to own all partitions")
        wait_for(lambda: job.total_batches() >= PARTS, 60, what="first batches")

        b, c = job.start(), job.start()
        wait_for(lambda: len(job.query("SELECT worker FROM pgstream.workers")) == 3, 30,
                 interval=0.02, what="b and c to join (their interpreters start first)")
        joined = settle(job, [a, b, c], "three workers to own two partitions each")
        wait_for(lambda: all(job.owned_by(w) for w in (a, b, c)), 5, what="three owners")
        batches = job.total_batches()
        wait_for(lambda: job.total_batches() >= batches + 3 * PARTS, 60, what="batches")

        assert b.terminate() == 0, b.output()[-3000:]  # leaves: its partitions go at once
        left = settle(job, [a, c], "two workers to own three partitions each")

        time.sleep(1.0)
        writers.stop()
        for w in (a, c):
            assert w.terminate() == 0, w.output()[-3000:]
        job.run_to_idle()

        for w in (a, b, c):
            out = w.output()
            assert "was taken over" not in out and "is stale" not in out, out[-3000:]
        assert "handed events/" in a.output(), a.output()[-3000:]
        n = assert_ledger_tiles(job)
        job.assert_outputs_exact()
        job.assert_verify_clean()
        print(f"\nrebalance: 1 -> 3 workers even {joined:.2f}s after b and c joined, 3 -> 2 "
              f"(SIGTERM) even {left:.2f}s after b exited; "
              f"{n} batches, none fenced")
        assert joined < SETTLE and left < SETTLE
    finally:
        writers._stop.set()
        job.cleanup()

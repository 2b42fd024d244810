"""A table split into partitions by a hash of ``user_id`` (issue 12 part 3): out-of-order
concurrent writers, two ``pgstream run`` processes sharing the partitions, one SIGKILLed
mid-run; at the end every sink equals the reference and ``verify`` is clean. Changing the
number of partitions is refused as a source change."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from harness import Job, TableWriters, insert_events, wait_for

import pgstream as ps
from pgstream.errors import ConfigError

PARTS = 4


def test_split_table_shared_by_two_workers_with_a_kill_is_exact(
    pg_dsn: str, tmp_path: Path
) -> None:
    job = Job(pg_dsn, tmp_path, lease=3.0, batch=50, split=PARTS).setup()
    writers = TableWriters(pg_dsn, "events", threads=3, users=40, seed=12)
    try:
        insert_events(pg_dsn, "events", 1500, users=40, seed=4)
        writers.start()
        a = job.start()
        b = job.start()
        wait_for(
            lambda: job.owned_by(a) and job.owned_by(b), 30,
            what="both workers to own partitions",
        )
        wait_for(lambda: job.total_batches() >= 20, 60, what="batches")
        a.kill()  # SIGKILL mid-run: b (or the final run) takes its partitions over
        time.sleep(1.5)
        writers.stop()
        assert b.terminate() == 0, b.output()[-3000:]
        job.run_to_idle()
        parts = job.partitions()
        assert sorted(parts) == [("events", str(i)) for i in range(PARTS)]
        assert all(p["committed"] is not None for p in parts.values())
        job.assert_outputs_exact()
        job.assert_verify_clean()
    finally:
        writers._stop.set()
        job.cleanup()


def test_changing_the_number_of_partitions_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    job = Job(pg_dsn, tmp_path, split=PARTS).setup()
    try:
        insert_events(pg_dsn, "events", 100, seed=5)
        job.run_to_idle()
        w = job.start(stop_when_idle=True, env={"FAULTAPP_PARTITIONS": "2"})
        assert w.wait(60) != 0
        out = w.output()
        assert "partitions 4 by user_id" in out and "partitions 2 by user_id" in out, out
        assert "pgstream job reset" in out, out
        reset = subprocess.run(
            job.command("job", "reset", "faultapp:app", "--dsn", pg_dsn, "--stream", "events",
                        "--yes"),
            env=job.env(FAULTAPP_PARTITIONS="2"), cwd=tmp_path, capture_output=True, text=True,
            timeout=60,
        )
        assert reset.returncode == 0, reset.stdout + reset.stderr
        again = job.start(
            stop_when_idle=True, env={"FAULTAPP_PARTITIONS": "2"}, args=["--accept-changes"]
        )
        assert again.wait(60) == 0, again.output()[-3000:]
        assert sorted(job.partitions()) == [("events", "0"), ("events", "1")]
    finally:
        job.cleanup()


def test_split_options_and_identity() -> None:
    one = ps.TableSource("public.orders", offset_column="id")
    assert one.identity() == "table public.orders offset id"
    assert one.partition_filter("0") is None
    split = ps.TableSource("orders", offset_column="id", partitions=8, partition_by="user_id")
    assert split.identity() == "table public.orders offset id partitions 8 by user_id"
    assert list(split.partitions(None)) == [str(i) for i in range(8)]  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="partition_by"):
        ps.TableSource("orders", partitions=4)
    with pytest.raises(ConfigError, match="partitions > 1"):
        ps.TableSource("orders", partition_by="user_id")
    with pytest.raises(ConfigError, match=">= 1"):
        ps.TableSource("orders", partitions=0, partition_by="user_id")

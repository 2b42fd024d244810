"""A fold keyed across partitions (issue 12 part 5) run by a group: two ``pgstream run``
processes share the split table's partitions and the repartition's partitions while writers
commit out of order; one worker is SIGKILLed mid-run. At the end the fold equals the reference
computed from the input alone, every record was handed over exactly once, the poison records
are dead letters of the second stage, ``verify`` is clean and ``status`` shows both stages."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from harness import APPS, TableWriters, WorkerProc, insert_events, wait_for

# isort: split
import repartapp  # importable once harness put the apps on sys.path

JOB = "repart-group"
TARGET = "repartapp:app"
STAGE2 = "events:fold:user_state:repartition"


class Group:
    """``pgstream run repartapp:app`` processes against one database."""

    def __init__(self, dsn: str, workdir: Path) -> None:
        self.dsn = dsn
        self.workdir = workdir
        self.workers: list[WorkerProc] = []

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pgstream", *args, "--dsn", self.dsn]

    def env(self) -> dict[str, str]:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
        env.update(PYTHONPATH=str(APPS), PYTHONUNBUFFERED="1")
        return env

    def start(self, *extra: str) -> WorkerProc:
        log = self.workdir / f"worker-{len(self.workers) + 1}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*self.command("run", TARGET), "-v", *extra], stdout=out,
                stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir,
                start_new_session=True,
            )
        worker = WorkerProc(proc, log, time.monotonic())
        self.workers.append(worker)
        return worker

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args), capture_output=True, text=True, env=self.env(),
            cwd=self.workdir, timeout=300,
        )

    def query(self, q: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(q, params).fetchall()

    def owned_by(self, w: WorkerProc) -> list[tuple[str, str]]:
        tag = f":{w.pid}:"
        rows = self.query(
            "SELECT source, partition, owner FROM pgstream.partitions "
            "WHERE job = %s AND lease_expires_at > now()", [JOB]
        )
        return [(s, p) for s, p, owner in rows if owner and tag in owner]

    def batches(self, source: str) -> int:
        rows = self.query(
            "SELECT coalesce(sum(batches), 0) FROM pgstream.partitions "
            "WHERE job = %s AND source = %s", [JOB, source]
        )
        return int(rows[0][0])

    def cleanup(self) -> None:
        for w in self.workers:
            if w.alive():
                w.kill()


def test_repartitioned_fold_shared_by_two_workers_with_a_kill_is_exact(
    pg_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(repartapp.DDL)
    group = Group(pg_dsn, tmp_path)
    writers = TableWriters(pg_dsn, "events", threads=3, users=30, seed=21)
    try:
        insert_events(pg_dsn, "events", 1500, users=30, seed=8)
        writers.start()
        a = group.start()
        b = group.start()
        wait_for(
            lambda: group.owned_by(a) and group.owned_by(b), 30,
            what="both workers to own partitions",
        )
        wait_for(
            lambda: group.batches("events") >= 10 and group.batches(STAGE2) >= 5, 60,
            what="batches of both stages",
        )
        a.kill()  # SIGKILL mid-run: b (or the final run) takes its partitions over
        time.sleep(1.5)
        writers.stop()
        assert b.terminate() == 0, b.output()[-3000:]
        final = group.start("--stop-when-idle")
        assert final.wait(120) == 0, final.output()[-3000:]

        rows = [(int(i), int(u), int(a_)) for i, u, a_ in
                group.query("SELECT id, user_id, amount FROM events")]
        got = {int(u): (int(n), int(t), int(s)) for u, n, t, s in
               group.query("SELECT user_id, n, total, sq FROM user_state")}
        assert got == repartapp.reference(rows)
        kept = sorted(i for i, _, amount in rows if amount != 0)
        handed = group.query(
            "SELECT src_offset FROM pgstream.repartition WHERE job = %s ORDER BY 1", [JOB]
        )
        assert [int(r[0]) for r in handed] == kept  # each record handed over exactly once
        dead = group.query(
            "SELECT source, count(*) FROM pgstream.dead_letters WHERE job = %s GROUP BY 1", [JOB]
        )
        poison = sum(1 for _, _, amount in rows if amount == repartapp.POISON_AMOUNT)
        assert dict(dead) == ({STAGE2: poison} if poison else {})

        verify = group.cli("verify", TARGET)
        assert verify.returncode == 0, verify.stdout + verify.stderr

        status = group.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        items = json.loads(status.stdout)
        stages = {(it["source"], it["stage"]) for it in items}
        assert stages == {("events", "hand-over"), (STAGE2, "fold")}
        folds = [it for it in items if it["stage"] == "fold"]
        assert len(folds) == repartapp.REPARTITIONS
        assert sum(it["handed_over"] for it in folds) == len(kept)
        assert all(it["lag"] == 0 for it in folds)
        text = group.cli("status").stdout
        assert f"repartition {STAGE2}" in text and f"{len(kept)} rows handed over" in text, text
    finally:
        writers._stop.set()
        group.cleanup()

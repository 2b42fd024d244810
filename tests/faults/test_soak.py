"""Soak (issue 3 part 9): a bounded chaos run, then ``verify`` and an exact comparison.

Three ``pgstream run`` workers share three partitions (two tables written out of id order
by concurrent writers, one growing JSON Lines file) with a 2 s lease, while the test
randomly SIGKILLs workers (and restarts them), freezes them with SIGSTOP past their lease
and resumes them (zombies), and terminates their database sessions with
``pg_terminate_backend``. Afterwards the producers stop, a final ``run --stop-when-idle``
catches up, every sink equals the reference computed from the inputs, and
``pgstream verify`` reports lost = 0, duplicated = 0.

``PGSTREAM_SOAK_SECONDS`` (default 45) sets the chaos duration, ``PGSTREAM_SOAK_SEED`` the
random schedule. The summary is printed and written to ``benchmarks/out/soak.json``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from harness import JOB, FileWriter, Inputs, Job, TableWriters, WorkerProc, file_records

SECONDS = float(os.environ.get("PGSTREAM_SOAK_SECONDS", "45"))
WORKERS = 3
LEASE = 2.0
OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "out" / "soak.json"


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 240)
def test_soak(pg_dsn: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("PGSTREAM_SOAK_SEED", "0")) or random.randrange(1, 10**9)
    rng = random.Random(seed)
    job = Job(pg_dsn, tmp_path, tables=["events", "events2"], with_file=True, lease=LEASE,
              batch=200).setup()
    writers = [
        TableWriters(pg_dsn, t, threads=2, seed=rng.random()).start() for t in job.tables
    ]
    files = FileWriter(job.file, rate=300, seed=rng.random()).start()
    chaos = Chaos(job, rng)
    try:
        chaos.run(time.monotonic() + SECONDS)
    finally:
        for w in writers:
            w.stop()
        files.stop()
        chaos.resume_frozen()
    try:
        chaos.stop_workers()
        logs = [w.output() for w in job.workers]
        rejected = sum(log.count("is stale") for log in logs)  # CAS refused a zombie's batch
        renew_lost = sum(log.count("was taken over") for log in logs)
        assert not chaos.exits, "workers exited on their own:\n" + "\n".join(chaos.exits)
        job.run_to_idle()
        assert job.caught_up(), f"not caught up: {job.partitions()} vs {job.heads()}"
        ref = job.assert_outputs_exact()
        rc, out = job.verify()
        assert rc == 0, out
        report = _verify_json(job)
        ledger = _ledger_records(job)
    finally:
        job.cleanup()

    parts = job.partitions()
    inputs = job.inputs()
    counts = report["counts"]
    faults = chaos.faults
    summary = {
        "seconds": round(SECONDS, 1),
        "seed": seed,
        "workers": WORKERS,
        "lease_seconds": LEASE,
        "partitions": len(parts),
        "records": report["records"],
        "table_rows": sum(len(v) for v in inputs.events.values()),
        "file_lines": files.lines,
        "append_rows": report["append_rows"],
        "dead_letters": report["dead_letters"],
        "batches": report["batches"],
        "takeovers": sum(p["epoch"] - 1 for p in parts.values()),
        "faults": {
            "sigkill": faults["sigkill"],
            "sigstop": faults["sigstop"],
            "terminate_backend": faults["terminate_backend"],
            "backends_terminated": faults["backends_terminated"],
        },
        "zombie_commits_rejected": rejected,
        "zombie_renewals_refused": renew_lost,
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "unexpected": counts["unexpected"],
        "reference_rows": len(ref.event_facts) + len(ref.click_facts),
        "command": (
            f"PGSTREAM_TEST_DSN=postgresql://root@127.0.0.1:5432/test "
            f"PGSTREAM_SOAK_SECONDS={SECONDS:g} PGSTREAM_SOAK_SEED={seed} "
            ".venv/bin/pytest -s tests/faults/test_soak.py"
        ),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=2) + "\n")
    f = summary["faults"]
    print(
        f"\nsoak: {summary['records']} records over {SECONDS:g}s, {WORKERS} workers; faults: "
        f"sigkill={f['sigkill']} sigstop={f['sigstop']} "
        f"terminate_backend={f['terminate_backend']} ({f['backends_terminated']} sessions); "
        f"takeovers={summary['takeovers']} zombie commits rejected={rejected} "
        f"zombie renewals refused={renew_lost}; "
        f"lost={summary['lost']} duplicated={summary['duplicated']} (seed {seed}) -> {OUT}"
    )
    # Independent of verify and of the sink comparison: the ledger, written by the batches
    # themselves, counts every input record exactly once per partition (a batch committed
    # twice or a range committed by no batch would show here), and so do the partition rows.
    expected = _input_records(inputs)
    assert ledger == expected, f"ledger records_in {ledger} != input records {expected}"
    assert {k: p["records"] for k, p in parts.items()} == expected, parts
    assert faults["sigkill"] and faults["sigstop"] and faults["terminate_backend"], faults


class Chaos:
    """The fault schedule: SIGKILL (and restart), SIGSTOP past the lease (zombies) and
    ``pg_terminate_backend`` on the job's workers, chosen by ``rng``."""

    def __init__(self, job: Job, rng: random.Random) -> None:
        self.job = job
        self.rng = rng
        self.faults: Counter[str] = Counter()
        self.exits: list[str] = []
        self.workers: list[WorkerProc] = [job.start() for _ in range(WORKERS)]
        self.frozen: dict[int, float] = {}  # pid -> resume time
        self.restart_at: list[float] = []

    def run(self, deadline: float) -> None:
        """Inject faults until ``deadline`` (monotonic)."""
        while time.monotonic() < deadline:
            now = time.monotonic()
            self._thaw(now)
            self._reap(now)
            self._restart(now)
            self._strike(now)
            time.sleep(self.rng.uniform(0.2, 0.9))

    def _thaw(self, now: float) -> None:
        for w in self.workers:
            if w.pid in self.frozen and self.frozen[w.pid] <= now:
                w.cont()
                del self.frozen[w.pid]

    def _reap(self, now: float) -> None:
        """A worker that exited without being killed is a failure (noted, then restarted)."""
        for w in list(self.workers):
            if not w.alive() and w.proc.returncode != -signal.SIGKILL:
                self.exits.append(f"pid {w.pid} exited {w.proc.returncode}:\n{w.output()[-2000:]}")
                self.workers.remove(w)
                self.restart_at.append(now)

    def _restart(self, now: float) -> None:
        for t in [t for t in self.restart_at if t <= now]:
            self.restart_at.remove(t)
            self.workers.append(self.job.start())

    def _strike(self, now: float) -> None:
        rng = self.rng
        running = [w for w in self.workers if w.alive() and w.pid not in self.frozen]
        kind = rng.choices(["sigkill", "sigstop", "terminate_backend"], [3, 2, 4])[0]
        if kind == "sigkill" and len(running) >= 2:
            victim = rng.choice(running)
            victim.kill()
            self.workers.remove(victim)
            self.restart_at.append(now + rng.random() * 1.5)
            self.faults["sigkill"] += 1
        elif kind == "sigstop" and len(running) >= 2 and len(self.frozen) < 2:
            victim = rng.choice(running)
            victim.stop()
            self.frozen[victim.pid] = now + rng.uniform(0.3, 2.5 * LEASE)
            self.faults["sigstop"] += 1
        elif kind == "terminate_backend":
            n = self.job.terminate_backends()
            if n:
                self.faults["terminate_backend"] += 1
                self.faults["backends_terminated"] += n

    def resume_frozen(self) -> None:
        for w in self.workers:
            if w.stopped:
                w.cont()

    def stop_workers(self) -> None:
        """SIGTERM every live worker; one that does not exit 0 is a failure."""
        for w in self.workers:
            if w.alive():
                rc = w.terminate(timeout=60)
                if rc != 0:
                    self.exits.append(
                        f"pid {w.pid} exited {rc} on SIGTERM:\n{w.output()[-2000:]}"
                    )


def _ledger_records(job: Job) -> dict[tuple[str, str], int]:
    """Per partition, the records the ledger's batches say they read."""
    rows = job.query(
        "SELECT source, partition, sum(records_in) FROM pgstream.batches WHERE job = %s "
        "GROUP BY source, partition",
        [JOB],
    )
    return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}


def _input_records(inputs: Inputs) -> dict[tuple[str, str], int]:
    """Per partition, the records in the inputs: every table row, every complete non-blank
    line of the file (undecodable ones too: they are read, then dead-lettered)."""
    counts = {(table, "0"): len(rows) for table, rows in inputs.events.items()}
    counts[("clicks", "0")] = sum(1 for _ in file_records(inputs.file))
    return counts


def _verify_json(job: Job) -> dict[str, Any]:
    import subprocess

    res = subprocess.run(
        [sys.executable, "-m", "pgstream", "verify", "faultapp:app", "--dsn", job.dsn, "--json"],
        capture_output=True, env=job.env(), cwd=job.workdir, timeout=300,
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    data: dict[str, Any] = json.loads(res.stdout)
    return data

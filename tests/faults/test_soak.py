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

import pytest
from harness import FileWriter, Job, TableWriters, WorkerProc

SECONDS = float(os.environ.get("PGSTREAM_SOAK_SECONDS", "45"))
WORKERS = 3
LEASE = 2.0
OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "out" / "soak.json"


@pytest.mark.timeout(SECONDS + 240)
def test_soak(pg_dsn: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("PGSTREAM_SOAK_SEED", "0")) or random.randrange(1, 10**9)
    rng = random.Random(seed)
    job = Job(pg_dsn, tmp_path, tables=["events", "events2"], with_file=True, lease=LEASE,
              batch=200).setup()
    faults: Counter[str] = Counter()
    exits: list[str] = []
    writers = [
        TableWriters(pg_dsn, t, threads=2, seed=rng.random()).start() for t in job.tables
    ]
    files = FileWriter(job.file, rate=300, seed=rng.random()).start()
    workers: list[WorkerProc] = [job.start() for _ in range(WORKERS)]
    frozen: dict[int, float] = {}  # pid -> resume time
    restart_at: list[float] = []
    started = time.monotonic()
    deadline = started + SECONDS
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            for w in workers:
                if w.pid in frozen and frozen[w.pid] <= now:
                    w.cont()
                    del frozen[w.pid]
            for w in list(workers):
                if not w.alive() and w.proc.returncode != -signal.SIGKILL:
                    exits.append(f"pid {w.pid} exited {w.proc.returncode}:\n{w.output()[-2000:]}")
                    workers.remove(w)
                    restart_at.append(now)
            for t in [t for t in restart_at if t <= now]:
                restart_at.remove(t)
                workers.append(job.start())
            running = [w for w in workers if w.alive() and w.pid not in frozen]
            kind = rng.choices(["sigkill", "sigstop", "terminate_backend"], [3, 2, 4])[0]
            if kind == "sigkill" and len(running) >= 2:
                victim = rng.choice(running)
                victim.kill()
                workers.remove(victim)
                restart_at.append(now + rng.random() * 1.5)
                faults["sigkill"] += 1
            elif kind == "sigstop" and len(running) >= 2 and len(frozen) < 2:
                victim = rng.choice(running)
                victim.stop()
                frozen[victim.pid] = now + rng.uniform(0.3, 2.5 * LEASE)
                faults["sigstop"] += 1
            elif kind == "terminate_backend":
                n = job.terminate_backends()
                if n:
                    faults["terminate_backend"] += 1
                    faults["backends_terminated"] += n
            time.sleep(rng.uniform(0.2, 0.9))
    finally:
        for w in writers:
            w.stop()
        files.stop()
        for w in workers:
            if w.stopped:
                w.cont()
    try:
        for w in workers:
            if w.alive():
                rc = w.terminate(timeout=60)
                if rc != 0:
                    exits.append(f"pid {w.pid} exited {rc} on SIGTERM:\n{w.output()[-2000:]}")
        logs = [w.output() for w in job.workers]
        rejected = sum(log.count("is stale") for log in logs)  # CAS refused a zombie's batch
        renew_lost = sum(log.count("was taken over") for log in logs)
        assert not exits, "workers exited on their own:\n" + "\n".join(exits)
        job.run_to_idle()
        assert job.caught_up(), f"not caught up: {job.partitions()} vs {job.heads()}"
        ref = job.assert_outputs_exact()
        rc, out = job.verify()
        assert rc == 0, out
        report = _verify_json(job)
    finally:
        job.cleanup()

    parts = job.partitions()
    inputs = job.inputs()
    counts = report["counts"]
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
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert faults["sigkill"] and faults["sigstop"] and faults["terminate_backend"], faults


def _verify_json(job: Job) -> dict[str, object]:
    import subprocess

    res = subprocess.run(
        [sys.executable, "-m", "pgstream", "verify", "faultapp:app", "--dsn", job.dsn, "--json"],
        capture_output=True, env=job.env(), cwd=job.workdir, timeout=300,
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    data: dict[str, object] = json.loads(res.stdout)
    return data

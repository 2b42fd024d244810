"""Soak (issue 3 part 9, grown for worker groups in issue 12 part 6): a bounded chaos run,
then ``verify`` and an exact comparison.

A worker group of 2-4 ``pgstream run`` processes shares seven partitions (two tables, each
split into three partitions by ``user_id`` and written out of id order by concurrent
writers, plus one growing JSON Lines file) with a 2 s lease. Workers join and leave (SIGTERM)
during the run, and the test injects five kinds of fault at random:

* ``sigkill``: a worker is SIGKILLed (and a new one started a moment later);
* ``sigstop``: a worker is frozen with SIGSTOP, often past its lease, then resumed (a zombie);
* ``terminate_backend``: ``pg_terminate_backend`` on every worker session;
* ``commit_cut``: the proxy between the workers and PostgreSQL cuts the connection during a
  checkpoint COMMIT, either dropping the COMMIT (the batch did not land) or swallowing the
  server's reply (it did): the worker cannot tell which and must find out;
* ``server_restart``: the PostgreSQL server is stopped with ``pg_ctl -m immediate`` (every
  backend killed, crash recovery on start) and started again (at most every 10 s). A worker
  that starts while the server is down, or exhausts its reconnect budget, exits 1 with one
  clear error; that is expected (counted, and the worker is started again); any other exit
  is a failure.

The job runs on a throwaway cluster of its own (``initdb`` in a temporary directory, see
``netfaults.Cluster``), never the shared server; where no server binaries are found it runs
on the shared server without ``server_restart``. Afterwards the producers stop, a final
``run --stop-when-idle`` catches up, every sink equals the reference computed from the
inputs, the ledger counts every input record once per partition, and ``pgstream verify``
reports lost = 0, duplicated = 0.

``PGSTREAM_SOAK_SECONDS`` (default 45) sets the chaos duration, ``PGSTREAM_SOAK_SEED`` the
random schedule. The summary is printed and written to ``benchmarks/out/soak.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import JOB, FileWriter, Inputs, Job, TableWriters, WorkerProc, file_records
from netfaults import Cluster, PgProxy

from pgstream.db import migrate

SECONDS = float(os.environ.get("PGSTREAM_SOAK_SECONDS", "45"))
MIN_WORKERS = 2
MAX_WORKERS = 4
SPLIT = 3  # partitions of each source table
LEASE = 2.0
RESTART_GAP = 10.0  # seconds between two server restarts at least
KINDS = ["sigkill", "sigstop", "terminate_backend", "commit_cut", "server_restart"]
WEIGHTS = [3, 2, 3, 2, 1]
OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "out" / "soak.json"


@pytest.fixture
def soak_server(pg_dsn: str) -> Iterator[tuple[str, Cluster | None]]:
    """(DSN of a migrated database, its throwaway cluster or None for the shared server)."""
    try:
        cluster = Cluster(max_connections=100)
    except (FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"soak: no throwaway cluster ({exc}); no server restarts")
        yield pg_dsn, None
        return
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE soak")
        dsn = cluster.dsn("soak")
        migrate.upgrade(dsn)
        yield dsn, cluster
    finally:
        cluster.destroy()


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 300)
def test_soak(soak_server: tuple[str, Cluster | None], tmp_path: Path) -> None:
    dsn, cluster = soak_server
    seed = int(os.environ.get("PGSTREAM_SOAK_SEED", "0")) or random.randrange(1, 10**9)
    rng = random.Random(seed)
    with PgProxy.for_dsn(dsn) as proxy:
        job = Job(dsn, tmp_path, tables=["events", "events2"], with_file=True, lease=LEASE,
                  batch=200, split=SPLIT, run_dsn=proxy.dsn(dsn)).setup()
        writers = [
            RestartProofWriters(dsn, t, threads=2, seed=rng.random()).start() for t in job.tables
        ]
        files = FileWriter(job.file, rate=300, seed=rng.random()).start()
        chaos = Chaos(job, rng, proxy, cluster)
        started = time.monotonic()
        try:
            chaos.run(started + SECONDS)
        finally:
            for w in writers:
                w.stop()
            files.stop()
            chaos.resume_frozen()
            proxy.disarm()
        try:
            chaos.stop_workers()
            logs = [w.output() for w in job.workers]
            rejected = sum(log.count("is stale") for log in logs)  # CAS refused a zombie
            renew_lost = sum(log.count("was taken over") for log in logs)
            assert not chaos.exits, "workers failed:\n" + "\n".join(chaos.exits)
            job.run_to_idle(timeout=240)
            duration = time.monotonic() - started
            ref = job.assert_outputs_exact()
            rc, out = job.verify()
            assert rc == 0, out
            report = _verify_json(job)
            ledger = _ledger_records(job)
            expected = _input_records(job, job.inputs())
        finally:
            job.cleanup()
        chaos.count_commit_cuts()

    parts = job.partitions()
    counts = report["counts"]
    faults = chaos.faults
    summary = {
        "seconds": round(SECONDS, 1),
        "wall_seconds": round(duration, 1),
        "seed": seed,
        "workers": f"{MIN_WORKERS}-{MAX_WORKERS}",
        "lease_seconds": LEASE,
        "partitions": len(parts),
        "records": report["records"],
        "table_rows": sum(expected[k] for k in expected if k[0] != "clicks"),
        "file_lines": files.lines,
        "append_rows": report["append_rows"],
        "dead_letters": report["dead_letters"],
        "batches": report["batches"],
        "takeovers": sum(p["epoch"] - 1 for p in parts.values()),
        "faults_total": sum(faults[k] for k in KINDS),
        "faults": {k: faults[k] for k in KINDS},
        "backends_terminated": faults["backends_terminated"],
        "commit_cuts": {"cut_reply": faults["cut_reply"], "drop_commit": faults["drop_commit"]},
        "joins": chaos.joins,
        "leaves": chaos.leaves,
        "starts_refused_while_server_down": chaos.refused_starts,
        "gave_up_while_server_down": chaos.gave_up,
        "zombie_commits_rejected": rejected,
        "zombie_renewals_refused": renew_lost,
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "unexpected": counts["unexpected"],
        "reference_rows": len(ref.event_facts) + len(ref.click_facts),
        "server": "throwaway cluster" if cluster else "shared server (no restarts)",
        "command": (
            f"PGSTREAM_TEST_DSN=postgresql://root@127.0.0.1:5432/test "
            f"PGSTREAM_SOAK_SECONDS={SECONDS:g} PGSTREAM_SOAK_SEED={seed} "
            ".venv/bin/pytest -s tests/faults/test_soak.py"
        ),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=2) + "\n")
    kinds = " ".join(f"{k}={faults[k]}" for k in KINDS)
    print(
        f"\nsoak: {summary['records']} records over {SECONDS:g}s, {summary['partitions']} "
        f"partitions, {MIN_WORKERS}-{MAX_WORKERS} workers ({chaos.joins} joins, "
        f"{chaos.leaves} leaves); {summary['faults_total']} faults: {kinds}; "
        f"takeovers={summary['takeovers']} zombie commits rejected={rejected}; worker exits "
        f"while the server was down: {chaos.refused_starts} at start, {chaos.gave_up} gave up; "
        f"lost={summary['lost']} duplicated={summary['duplicated']} (seed {seed}) -> {OUT}"
    )
    # Independent of verify and of the sink comparison: the ledger, written by the batches
    # themselves, counts every input record exactly once per partition (a batch committed
    # twice or a range committed by no batch would show here), and so do the partition rows.
    assert ledger == expected, f"ledger records_in {ledger} != input records {expected}"
    assert {k: p["records"] for k, p in parts.items() if p["records"]} == expected, parts
    assert counts["lost"] == 0 and counts["duplicated"] == 0, counts
    missing = [k for k in KINDS if not faults[k] and (k != "server_restart" or cluster)]
    assert not missing, f"fault kinds never injected: {missing} ({dict(faults)})"


class RestartProofWriters(TableWriters):
    """:class:`TableWriters` that reconnect when the server goes away (a restart): whatever
    committed is in the table, and the reference is computed from the table."""

    def _run(self, idx: int) -> None:
        while not self._stop.is_set():
            try:
                super()._run(idx)
            finally:
                errors, self.errors[:] = list(self.errors), []
            fatal = [e for e in errors if not isinstance(e, psycopg.OperationalError)]
            if fatal:
                self.errors.extend(fatal)
                return
            if errors:
                time.sleep(0.2)


class Chaos:
    """The fault and membership schedule, chosen by ``rng``: workers join and leave between
    ``MIN_WORKERS`` and ``MAX_WORKERS``; faults of every kind in :data:`KINDS`."""

    def __init__(
        self, job: Job, rng: random.Random, proxy: PgProxy, cluster: Cluster | None
    ) -> None:
        self.job = job
        self.rng = rng
        self.proxy = proxy
        self.cluster = cluster
        self.faults: Counter[str] = Counter()
        self.exits: list[str] = []
        self.joins = 0
        self.leaves = 0
        self.refused_starts = 0
        self.gave_up = 0
        self.last_restart = -1e9
        self.workers: list[WorkerProc] = [job.start() for _ in range(3)]
        self.leaving: list[WorkerProc] = []
        self.frozen: dict[int, float] = {}  # pid -> resume time
        self.restart_at: list[float] = []
        kinds = [k for k in KINDS if k != "server_restart" or cluster]
        rng.shuffle(kinds)
        self.first = kinds  # every kind once early, so a short run sees all of them

    def run(self, deadline: float) -> None:
        """Inject faults until ``deadline`` (monotonic)."""
        warm = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            now = time.monotonic()
            self._thaw(now)
            self._reap(now)
            self._restart(now)
            if now >= warm:
                self._membership(now)
                self._strike(now)
            time.sleep(self.rng.uniform(0.2, 0.9))

    def _live(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.alive()]

    def _running(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.alive() and w.pid not in self.frozen]

    def _thaw(self, now: float) -> None:
        for w in self.workers:
            if w.pid in self.frozen and self.frozen[w.pid] <= now:
                w.cont()
                del self.frozen[w.pid]

    def _reap(self, now: float) -> None:
        """A worker that exited without being killed is a failure (noted, then replaced);
        one that left on SIGTERM must have exited 0."""
        for w in list(self.leaving):
            if not w.alive():
                self.leaving.remove(w)
                if w.proc.returncode != 0:
                    self.exits.append(f"pid {w.pid} exited {w.proc.returncode} on SIGTERM:\n"
                                      f"{w.output()[-2000:]}")
        for w in list(self.workers):
            if w.alive() or w.proc.returncode == -signal.SIGKILL:
                continue
            if self._refused_while_down(w, now):
                self.workers.remove(w)
                self.restart_at.append(now + 0.5)
                continue
            self.exits.append(f"pid {w.pid} exited {w.proc.returncode}:\n{w.output()[-2000:]}")
            self.workers.remove(w)
            self.restart_at.append(now)

    def _refused_while_down(self, w: WorkerProc, now: float) -> bool:
        """A worker that started while the server was down stops at once, and one that lost
        the server and could not get it back within its retry budget (8 retries, about 17 s)
        stops too, each with one clear error: that is ``pgstream run``'s documented
        behaviour, not a failure; it is started again, as ``--workers`` or systemd would."""
        if w.proc.returncode != 1 or now - self.last_restart > 40.0:
            return False
        out = w.output()
        if "error: cannot connect to database" in out:
            self.refused_starts += 1
            return True
        if "error: lost the database while running and could not get it back" in out:
            self.gave_up += 1
            return True
        return False

    def _restart(self, now: float) -> None:
        for t in [t for t in self.restart_at if t <= now]:
            self.restart_at.remove(t)
            self.workers.append(self.job.start())

    def _membership(self, now: float) -> None:
        """Now and then a worker joins the group or one leaves it (SIGTERM, not waited for
        here: :meth:`_reap` checks its exit status)."""
        r = self.rng.random()
        live = len(self._live()) + len(self.restart_at)
        if r < 0.06 and live < MAX_WORKERS:
            self.workers.append(self.job.start())
            self.joins += 1
        elif r < 0.12 and live > MIN_WORKERS:
            old = [w for w in self._running() if now - w.started > 4.0 and _ready(w)]
            if old:
                w = self.rng.choice(old)
                self.workers.remove(w)
                self.leaving.append(w)
                w.signal(signal.SIGTERM)
                self.leaves += 1

    def _strike(self, now: float) -> None:
        kinds = [k for k in KINDS if k != "server_restart" or self.cluster]
        weights = [w for k, w in zip(KINDS, WEIGHTS, strict=True) if k in kinds]
        kind = self.first.pop() if self.first else self.rng.choices(kinds, weights)[0]
        getattr(self, f"_{kind}")(now)

    def _sigkill(self, now: float) -> None:
        running = self._running()
        if len(running) >= 2:
            victim = self.rng.choice(running)
            victim.kill()
            self.workers.remove(victim)
            self.restart_at.append(now + self.rng.random() * 1.5)
            self.faults["sigkill"] += 1

    def _sigstop(self, now: float) -> None:
        running = self._running()
        if len(running) >= 2 and len(self.frozen) < 2:
            victim = self.rng.choice(running)
            victim.stop()
            self.frozen[victim.pid] = now + self.rng.uniform(0.3, 2.5 * LEASE)
            self.faults["sigstop"] += 1

    def _terminate_backend(self, now: float) -> None:
        with contextlib.suppress(psycopg.OperationalError):
            n = self.job.terminate_backends()
            if n:
                self.faults["terminate_backend"] += 1
                self.faults["backends_terminated"] += n

    def _commit_cut(self, now: float) -> None:
        """Arm the proxy for the next checkpoint COMMIT (counted when it fires)."""
        if not self.proxy.pending:
            self.proxy.arm(self.rng.choice(["cut_reply", "drop_commit"]))

    def _server_restart(self, now: float) -> None:
        assert self.cluster is not None
        if now - self.last_restart < RESTART_GAP:
            return  # the group must get work done between restarts
        self.cluster.restart_immediate(down=self.rng.uniform(0.1, 1.0))
        self.faults["server_restart"] += 1
        self.last_restart = time.monotonic()

    def count_commit_cuts(self) -> None:
        kinds = Counter(e.kind for e in self.proxy.stats.events)
        self.faults["cut_reply"] = kinds["cut_reply"]
        self.faults["drop_commit"] = kinds["drop_commit"]
        self.faults["commit_cut"] = kinds["cut_reply"] + kinds["drop_commit"]

    def resume_frozen(self) -> None:
        for w in self.workers:
            if w.stopped:
                w.cont()
        self.frozen.clear()

    def stop_workers(self) -> None:
        """SIGTERM every live worker; one that does not exit 0 is a failure."""
        for w in self.workers + self.leaving:
            deadline = time.monotonic() + 30
            while w.alive() and not _ready(w) and time.monotonic() < deadline:
                time.sleep(0.1)
            if w.alive() or w in self.leaving:
                rc = w.terminate(timeout=60) if w.alive() else w.proc.returncode
                if rc != 0:
                    self.exits.append(
                        f"pid {w.pid} exited {rc} on SIGTERM:\n{w.output()[-2000:]}"
                    )
        self.leaving.clear()


def _ready(w: WorkerProc) -> bool:
    """The worker printed something: past interpreter start-up, where SIGTERM would kill it
    before ``pgstream run`` installs its handler (the harness's 4 s is not always enough on
    a loaded 2-core machine)."""
    return w.log.exists() and w.log.stat().st_size > 0


def _ledger_records(job: Job) -> dict[tuple[str, str], int]:
    """Per partition, the records the ledger's batches say they read."""
    rows = job.query(
        "SELECT source, partition, sum(records_in) FROM pgstream.batches WHERE job = %s "
        "GROUP BY source, partition",
        [JOB],
    )
    return {(str(r[0]), str(r[1])): int(r[2]) for r in rows if r[2]}


def _input_records(job: Job, inputs: Inputs) -> dict[tuple[str, str], int]:
    """Per partition, the records in the inputs: every table row in its split partition
    (PostgreSQL's hash of ``user_id``, as documented), every complete non-blank line of the
    file (undecodable ones too: they are read, then dead-lettered)."""
    counts: dict[tuple[str, str], int] = {}
    for table in job.tables:
        for part, n in job.query(
            f"SELECT abs(mod(hashtextextended(user_id::text, 0), {SPLIT})), count(*) "
            f"FROM {table} GROUP BY 1"
        ):
            counts[(table, str(part))] = int(n)
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

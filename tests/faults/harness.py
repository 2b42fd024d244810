"""Fault-test harness: real ``pgstream run`` processes, out-of-order writers, a reference.

* :class:`Job` sets up a database for ``faultapp`` (tests/faults/apps/faultapp.py), starts
  ``python -m pgstream run faultapp:app --dsn ...`` subprocesses (:class:`WorkerProc`, with an
  environment for crash points), polls ``pgstream.partitions`` for progress, runs
  ``pgstream verify`` and compares every sink with :func:`reference`.
* :class:`TableWriters` insert into a source table from several threads whose transactions
  stay open for a while, so ids commit out of order (and some roll back, leaving holes).
* :class:`FileWriter` appends JSON lines to a file source, sometimes half a line at a time,
  sometimes a malformed line.
* :func:`reference` computes every sink's expected content from the inputs alone,
  independently of pgstream's operators.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
from proctools import wait_for as wait_for  # shared with tests outside faults/

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
sys.path.insert(0, str(APPS))

import faultapp  # noqa: E402

JOB = "faults"
TARGET = "faultapp:app"
T = TypeVar("T")


def faketime_env(offset: str) -> dict[str, str] | None:
    """Environment making a process see its wall clock shifted by ``offset`` (e.g. ``"-1d"``)
    through libfaketime (Debian package ``faketime``), or None when it is not installed.

    LD_PRELOAD keeps the pid (the ``faketime`` wrapper would fork). Only the wall clock is
    wrong, as with a misconfigured NTP: a faked CLOCK_MONOTONIC also breaks the timed waits
    of condition variables inside libfaketime's process, which no real machine does."""
    import glob

    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")) + sorted(
        glob.glob("/usr/lib/faketime/libfaketime.so.1")
    )
    if not libs:
        return None
    return {
        "LD_PRELOAD": libs[0],
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


# -- worker processes -----------------------------------------------------------------------


class WorkerProc:
    """One ``pgstream run`` subprocess, its log, and signals to it."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, started: float) -> None:
        self.proc = proc
        self.log = log
        self.started = started
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill(self) -> int | None:
        """SIGKILL and reap; returns the exit status."""
        if self.stopped:
            self.cont()
        self.signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGSTOP: freeze the process (its sessions stay open)."""
        self.signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        self.signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (clean stop between batches) and wait.

        A process only minutes-old is fine; one a fraction of a second old may still be in
        interpreter start-up, before any Python code can handle the signal, where SIGTERM's
        default action ends it: wait until it has installed its SIGTERM handler, or until 4 s
        after its start where that cannot be seen (importing pgstream took over 2 s once on a
        loaded 2-core CI box, and the soak saw a -15).
        """
        if self.stopped:
            self.cont()
        while time.monotonic() < self.started + 4.0 and not self.catches(signal.SIGTERM):
            time.sleep(0.02)
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def catches(self, sig: int) -> bool:
        """Whether the process has a handler installed for ``sig`` (Linux: ``SigCgt`` in
        /proc/PID/status; False where that cannot be read)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return False
        for line in status.splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
        return False

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# -- the job ----------------------------------------------------------------------------------


@dataclass
class Job:
    """A faultapp job in its own database, with helpers to run, fault and check it."""

    dsn: str
    workdir: Path
    tables: list[str] = field(default_factory=lambda: ["events"])
    with_file: bool = False
    lease: float = 10.0
    batch: int = 200
    extra_env: dict[str, str] = field(default_factory=dict)
    #: partitions of each source table (split by ``user_id``)
    split: int = 1
    #: DSN ``pgstream run`` / ``verify`` use (e.g. a non-superuser runtime role); default ``dsn``
    run_dsn: str | None = None
    #: the app ``pgstream run`` / ``verify`` load (``pushapp:app``: the pushed-down twin)
    target: str = TARGET
    workers: list[WorkerProc] = field(default_factory=list)
    _n: int = 0

    @property
    def file(self) -> Path:
        return self.workdir / "clicks.jsonl"

    def setup(self) -> Job:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(faultapp.ddl(self.tables, self.with_file))
        if self.with_file:
            self.file.touch()
        return self

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSTREAM_", "FAULTAPP_"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(APPS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            FAULTAPP_TABLES=",".join(self.tables),
            FAULTAPP_LEASE=str(self.lease),
            FAULTAPP_BATCH=str(self.batch),
            FAULTAPP_PARTITIONS=str(self.split),
            PYTHONUNBUFFERED="1",
        )
        if self.with_file:
            env["FAULTAPP_FILE"] = str(self.file)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pgstream", *args]

    def start(
        self,
        *,
        stop_when_idle: bool = False,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        args: list[str] | None = None,
    ) -> WorkerProc:
        """Start ``pgstream run faultapp:app`` (``prefix`` e.g. ``["faketime", "+1d"]``)."""
        self._n += 1
        log = self.workdir / f"worker-{self._n}.log"
        run = self.command("run", self.target, "--dsn", self.run_dsn or self.dsn, "-v")
        cmd = [*(prefix or []), *run]
        if stop_when_idle:
            cmd.append("--stop-when-idle")
        cmd += args or []
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(**(env or {})),
                cwd=self.workdir, start_new_session=True,
            )
        worker = WorkerProc(proc, log, time.monotonic())
        self.workers.append(worker)
        return worker

    def run_to_idle(self, timeout: float = 120, env: dict[str, str] | None = None) -> WorkerProc:
        """A final ``run --stop-when-idle``; asserts it exits 0."""
        w = self.start(stop_when_idle=True, env=env)
        try:
            rc = w.wait(timeout)
        except subprocess.TimeoutExpired:
            w.kill()
            raise AssertionError(
                f"run --stop-when-idle did not finish:\n{w.output()[-3000:]}"
            ) from None
        assert rc == 0, f"run --stop-when-idle exited {rc}:\n{w.output()[-3000:]}"
        return w

    def cleanup(self) -> None:
        for w in self.workers:
            if w.alive():
                with contextlib.suppress(Exception):
                    w.kill()

    # -- database views ------------------------------------------------------------------------

    def query(self, q: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(q, params).fetchall()

    def partitions(self) -> dict[tuple[str, str], dict[str, Any]]:
        rows = self.query(
            "SELECT source, partition, committed_offset, epoch, owner, batches, records, "
            "attempts, lease_expires_at, owner_backend_pid, now() FROM pgstream.partitions "
            "WHERE job = %s",
            [JOB],
        )
        names = ["source", "partition", "committed", "epoch", "owner", "batches", "records",
                 "attempts", "lease_expires_at", "owner_backend_pid", "now"]
        return {(r[0], r[1]): dict(zip(names, r)) for r in rows}

    def total_batches(self) -> int:
        return sum(p["batches"] for p in self.partitions().values())

    def owned_by(self, worker: WorkerProc) -> list[tuple[str, str]]:
        """Partitions whose current owner is ``worker`` (owner ids embed the pid)."""
        tag = f":{worker.pid}:"
        return [k for k, p in self.partitions().items() if p["owner"] and tag in p["owner"]]

    def heads(self) -> dict[tuple[str, str], int | None]:
        """Where each source ends now (exclusive), as the job's offsets count."""
        out: dict[tuple[str, str], int | None] = {}
        for t in self.tables:
            top = self.query(f"SELECT max(id) FROM {t}")[0][0]
            out[(t, "0")] = None if top is None else int(top) + 1
        if self.with_file:
            data = self.file.read_bytes()
            out[("clicks", "0")] = data.rfind(b"\n") + 1
        return out

    def caught_up(self) -> bool:
        parts = self.partitions()
        for key, head in self.heads().items():
            if head is None or head == 0:
                continue
            p = parts.get(key)
            if p is None or p["committed"] is None or p["committed"] < head:
                return False
        return True

    def terminate_backends(self) -> int:
        """``pg_terminate_backend`` every pgstream worker session of this database."""
        rows = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'pgstream:%%' "
            "AND pid <> pg_backend_pid()",
            [],
        )
        return sum(1 for r in rows if r[0])

    # -- checks ----------------------------------------------------------------------------------

    def verify(self) -> tuple[int, str]:
        """``pgstream verify faultapp:app``: (exit code, output)."""
        res = subprocess.run(
            self.command("verify", self.target, "--dsn", self.run_dsn or self.dsn),
            capture_output=True, env=self.env(), cwd=self.workdir, timeout=300,
        )
        return res.returncode, (res.stdout + res.stderr).decode(errors="replace")

    def assert_verify_clean(self) -> str:
        rc, out = self.verify()
        assert rc == 0, f"pgstream verify exited {rc}:\n{out[-5000:]}"
        return out

    def inputs(self) -> Inputs:
        events = {
            t: [(int(r[0]), int(r[1]), int(r[2]))
                for r in self.query(f"SELECT id, user_id, amount FROM {t} ORDER BY id")]
            for t in self.tables
        }
        data = self.file.read_bytes() if self.with_file else b""
        return Inputs(events, data)

    def actual(self) -> Outputs:
        out = Outputs()
        for r in self.query(
            "SELECT _source, _partition, _offset, _seq, event_id, user_id, cents FROM event_facts"
        ):
            out.event_facts.append(tuple(r))
        for t in self.tables:
            out.totals[t] = {
                int(r[0]): (int(r[1]), _num(r[2]), r[3], r[4], _num(r[5]), _num(r[6]), int(r[7]))
                for r in self.query(
                    f"SELECT user_id, n, total, lo, hi, mean, _mean_sum, _mean_count "
                    f"FROM {t}_totals"
                )
            }
            out.folds[t] = {
                int(r[0]): (int(r[1]), int(r[2]), int(r[3]))
                for r in self.query(f"SELECT user_id, n, h, last FROM {t}_fold")
            }
        if self.with_file:
            out.click_facts = [
                tuple(r) for r in self.query(
                    "SELECT _source, _partition, _offset, _seq, page, ms FROM click_facts"
                )
            ]
            out.page_counts = {
                r[0]: (int(r[1]), _num(r[2]))
                for r in self.query("SELECT page, n, total_ms FROM page_counts")
            }
        out.dead = [
            (r[0], r[1], int(r[2]), r[3])
            for r in self.query(
                'SELECT source, partition, "offset", operator FROM pgstream.dead_letters '
                "WHERE job = %s",
                [JOB],
            )
        ]
        return out

    def assert_outputs_exact(self) -> Outputs:
        """Every sink (and the dead letters) equals the reference computed from the inputs."""
        part_of = None
        if self.split > 1:  # the documented split: PostgreSQL's stable text hash
            part_of = {
                int(u): str(p) for u, p in self.query(
                    "SELECT u, abs(mod(hashtextextended(u::text, 0), %s)) "
                    "FROM generate_series(0, 10000) AS u", [self.split],
                )
            }
        ref = reference(self.inputs(), self.tables, part_of)
        act = self.actual()
        compare(ref, act)
        return ref


def _num(v: Any) -> Any:
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


# -- inputs, reference, comparison -------------------------------------------------------------


@dataclass
class Inputs:
    events: dict[str, list[tuple[int, int, int]]]  # table -> (id, user_id, amount) by id
    file: bytes


@dataclass
class Outputs:
    event_facts: list[tuple[Any, ...]] = field(default_factory=list)
    totals: dict[str, dict[int, tuple[Any, ...]]] = field(default_factory=dict)
    folds: dict[str, dict[int, tuple[int, int, int]]] = field(default_factory=dict)
    click_facts: list[tuple[Any, ...]] = field(default_factory=list)
    page_counts: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    dead: list[tuple[str, str, int, str]] = field(default_factory=list)


def file_records(data: bytes) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(offset, value or None if undecodable) for every complete non-blank line."""
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return
        line = data[pos:nl]
        if line.strip():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                value = None
            yield pos, value if isinstance(value, dict) else None
        pos = nl + 1


def reference(
    inputs: Inputs, tables: list[str], part_of: dict[int, str] | None = None
) -> Outputs:
    """Every sink's expected content, computed from the inputs without pgstream
    (``part_of``: a split table's partition of each user, else everything in ``"0"``)."""
    ref = Outputs()
    poison = faultapp.POISON_AMOUNT
    for t in tables:
        acc: dict[int, list[Any]] = {}
        folds: dict[int, tuple[int, int, int]] = {}
        for eid, user, amount in inputs.events[t]:
            if amount == 0:
                continue
            part = "0" if part_of is None else part_of[user]
            if amount == poison:
                ref.dead.append((t, part, eid, "to_table(event_facts)"))
                continue
            ref.event_facts.append((t, part, eid, 0, eid, user, amount * 100))
            if amount % 10 == 7:
                ref.event_facts.append((t, part, eid, 1, eid, user, -1))
            a = acc.get(user)
            if a is None:
                acc[user] = [1, amount, amount, amount]
            else:
                a[0] += 1
                a[1] += amount
                a[2] = min(a[2], amount)
                a[3] = max(a[3], amount)
            n, h, _last = folds.get(user, (0, 0, 0))
            folds[user] = (n + 1, (h * 31 + eid) % faultapp.HASH_MOD, eid)
        ref.totals[t] = {
            u: (n, total, lo, hi, total / n, total, n) for u, (n, total, lo, hi) in acc.items()
        }
        ref.folds[t] = folds
    pages: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for off, value in file_records(inputs.file):
        if value is None:
            ref.dead.append(("clicks", "0", off, "decode"))
            continue
        ref.click_facts.append(("clicks", "0", off, 0, value["page"], value["ms"]))
        p = pages[value["page"]]
        p[0] += 1
        p[1] += value["ms"]
    ref.page_counts = {k: (v[0], v[1]) for k, v in pages.items()}
    return ref


def compare(ref: Outputs, act: Outputs) -> None:
    """Assert ``act`` equals ``ref`` exactly (averages to 1e-9), naming lost/duplicated rows."""
    _same_rows("event_facts", ref.event_facts, act.event_facts)
    _same_rows("click_facts", ref.click_facts, act.click_facts)
    _same_rows(
        "dead letters",
        [d[:3] for d in ref.dead],
        [d[:3] for d in act.dead],
    )
    ops = Counter(d[3] for d in act.dead)
    assert not ops.get("worker") and not ops.get("sink"), f"runtime dead letters: {ops}"
    for t, want in ref.totals.items():
        got = act.totals[t]
        assert got.keys() == want.keys(), f"{t}_totals keys differ"
        for user, w in want.items():
            g = got[user]
            assert g[:4] == w[:4] and g[5:] == w[5:], f"{t}_totals[{user}]: {g} != {w}"
            assert abs(float(g[4]) - w[4]) < 1e-9, f"{t}_totals[{user}].mean: {g[4]} != {w[4]}"
    for t, want_fold in ref.folds.items():
        assert act.folds[t] == want_fold, f"{t}_fold differs"
    assert act.page_counts == ref.page_counts, "page_counts differ"


def _same_rows(name: str, want: list[Any], got: list[Any]) -> None:
    cw, cg = Counter(want), Counter(got)
    lost = cw - cg
    dup = Counter({k: n for k, n in cg.items() if n > 1 or (k in cw and n > cw[k])})
    unexpected = cg - cw
    assert not lost and not unexpected and not dup, (
        f"{name}: {sum(lost.values())} lost {list(lost)[:5]}, "
        f"{sum(unexpected.values())} unexpected {list(unexpected)[:5]}, "
        f"duplicated {list(dup)[:5]}"
    )


# -- writers -----------------------------------------------------------------------------------


class TableWriters:
    """Threads inserting into ``table`` in transactions held open for a random while, so
    ids (drawn at INSERT) commit out of order; some transactions roll back."""

    def __init__(
        self, dsn: str, table: str, *, threads: int = 3, users: int = 20,
        hold: float = 0.15, rollback_rate: float = 0.05, seed: float | None = None,
        rows_per_txn: tuple[int, int] = (1, 5),
    ) -> None:
        self.dsn = dsn
        self.table = table
        self.users = users
        self.hold = hold
        self.rollback_rate = rollback_rate
        self.rows_per_txn = rows_per_txn
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        self.committed = 0
        self.rolled_back = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def start(self) -> TableWriters:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        assert not self.errors, f"writer failed: {self.errors[0]!r}"

    def _run(self, idx: int) -> None:
        rng = random.Random(self.rng.random())
        try:
            with psycopg.connect(self.dsn, autocommit=False) as conn:
                while not self._stop.is_set():
                    n = rng.randint(*self.rows_per_txn)
                    for _ in range(n):
                        conn.execute(
                            f"INSERT INTO {self.table} (user_id, amount) VALUES (%s, %s)",
                            [rng.randrange(self.users), rng.randint(-3, 40)],
                        )
                        if rng.random() < 0.3:
                            time.sleep(rng.random() * self.hold / 3)
                    time.sleep(rng.random() * self.hold)
                    if rng.random() < self.rollback_rate:
                        conn.rollback()
                        with self._lock:
                            self.rolled_back += n
                    else:
                        conn.commit()
                        with self._lock:
                            self.committed += n
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)


def insert_events(dsn: str, table: str, n: int, *, users: int = 20, seed: int = 1) -> None:
    """Insert ``n`` events at once (ids in order)."""
    rng = random.Random(seed)
    rows = [(rng.randrange(users), rng.randint(-3, 40)) for _ in range(n)]
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY {table} (user_id, amount) FROM STDIN") as copy,
    ):
        for r in rows:
            copy.write_row(r)


def click_line(rng: random.Random, n: int) -> bytes:
    return orjson.dumps({"page": f"/p{rng.randrange(12)}", "ms": rng.randint(1, 999), "n": n})


def write_clicks(path: Path, n: int, *, seed: int = 2, bad_every: int = 50) -> None:
    """Append ``n`` click lines (every ``bad_every``-th one malformed) at once."""
    rng = random.Random(seed)
    with open(path, "ab") as f:
        for i in range(n):
            f.write(b"{not json\n" if bad_every and i % bad_every == bad_every - 1
                    else click_line(rng, i) + b"\n")


class FileWriter:
    """A thread appending click lines, sometimes in two writes (a partial line in between),
    sometimes a malformed line or a blank line."""

    def __init__(self, path: Path, *, rate: float = 200.0, seed: float | None = None) -> None:
        self.path = path
        self.rate = rate
        self.rng = random.Random(seed)
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def start(self) -> FileWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self.errors, f"file writer failed: {self.errors[0]!r}"

    def _run(self) -> None:
        rng = self.rng
        try:
            with open(self.path, "ab", buffering=0) as f:
                while not self._stop.is_set():
                    r = rng.random()
                    if r < 0.02:
                        line = b"{not json"
                    elif r < 0.03:
                        line = b""
                    else:
                        line = click_line(rng, self.lines)
                    if rng.random() < 0.1 and len(line) > 2:
                        cut = rng.randrange(1, len(line))
                        f.write(line[:cut])
                        time.sleep(rng.random() * 0.05)
                        f.write(line[cut:] + b"\n")
                    else:
                        f.write(line + b"\n")
                    self.lines += 1
                    time.sleep(rng.expovariate(self.rate))
        except BaseException as exc:
            self.errors.append(exc)

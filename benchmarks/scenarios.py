"""Recovery after ``kill -9`` and checkpoint latency under a steady producer (both B2, file)."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import procs
from benchmarks.workloads import (
    SINK,
    STREAM,
    Reference,
    check_b2,
    check_job,
    create_sink,
    forget_job,
    percentile,
    reference,
)


def _partition(conn: psycopg.Connection[Any], job: str) -> tuple[Any, ...] | None:
    return conn.execute(
        "SELECT committed_offset, epoch, batches, owner FROM pgstream.partitions "
        "WHERE job = %s AND source = %s",
        [job, STREAM],
    ).fetchone()


# -- recovery -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Recovery:
    """A worker SIGKILLed mid-run and its replacement."""

    killed: bool = False  # False: the first worker finished before it could be killed
    batches_before_kill: int = 0
    time_to_first_commit: float | None = None  # replacement: worker start -> first COMMIT
    replayed_records: int = 0  # read by the killed worker but not committed: done again
    killed_batch_records: int = 0  # the killed worker's last committed batch
    first_batch_records: int = 0
    errors: list[str] = field(default_factory=list)


def _records_between(path: Path, start: int, end: int) -> int:
    """How many lines start in ``[start, end)``."""
    if end <= start:
        return 0
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start).count(b"\n")


def recovery(
    conn: psycopg.Connection[Any],
    dsn: str,
    path: Path,
    ref: Reference,
    work_dir: Path,
    *,
    kill_after_batches: int = 3,
    batch_size: int | None = None,
) -> Recovery:
    """Run B2 from the file, SIGKILL the worker after a few commits, start a new one and time
    its first commit (from the worker's start, after interpreter start-up); then check that the
    output is exactly once."""
    job = "bench_recovery"
    res = Recovery()
    create_sink(conn, "B2")
    forget_job(conn, job)
    read_log = work_dir / "recovery-reads.log"
    read_log.unlink(missing_ok=True)
    first = procs.Child(
        procs.child_args(dsn, "B2", "file", path, job, batch_size=batch_size, read_log=read_log)
    )
    deadline = time.monotonic() + 120
    while first.running() and time.monotonic() < deadline:
        row = _partition(conn, job)
        if row is not None and row[2] >= kill_after_batches:
            first.kill9()
            res.killed = True
            break
        time.sleep(0.001)
    first_result = first.finish()
    if not res.killed and first_result.returncode != 0:
        res.errors.append(f"first worker failed: {first_result.stderr.strip()[-500:]}")
        return res
    row = _partition(conn, job)
    committed = row[0] if row else None
    res.batches_before_kill = row[2] if row else 0
    reads = [int(x) for x in read_log.read_text().split()] if read_log.exists() else []
    if res.killed and committed is not None and reads:
        res.replayed_records = _records_between(path, committed, max(reads))

    if res.killed:
        last = conn.execute(
            "SELECT records_in FROM pgstream.batches WHERE job = %s AND source = %s "
            "ORDER BY start_offset DESC LIMIT 1",
            [job, STREAM],
        ).fetchone()
        res.killed_batch_records = int(last[0]) if last else 0
    second = procs.run_child(procs.child_args(dsn, "B2", "file", path, job, batch_size=batch_size))
    if second.returncode != 0:
        res.errors.append(f"restarted worker failed: {second.stderr.strip()[-500:]}")
        return res
    rep = second.report
    if rep.get("first_commit") is not None:
        res.time_to_first_commit = rep["first_commit"] - rep["start"]
    if res.killed:
        first_new = conn.execute(
            "SELECT records_in FROM pgstream.batches WHERE job = %s AND source = %s "
            "AND start_offset = %s",
            [job, STREAM, committed if committed is not None else 0],
        ).fetchone()
        res.first_batch_records = int(first_new[0]) if first_new else 0
    res.errors += check_b2(conn, ref, "file") + check_job(conn, job, ref, "file")
    return res


# -- checkpoint latency -------------------------------------------------------------------------


@dataclass(slots=True)
class Latency:
    """Time from a record's append to the file until it is visible in the sink."""

    rate: float = 0.0  # achieved producer rate, events/s
    events: int = 0
    p50: float = float("nan")
    p99: float = float("nan")
    max: float = float("nan")
    errors: list[str] = field(default_factory=list)


def latency(
    conn: psycopg.Connection[Any],
    dsn: str,
    work_dir: Path,
    *,
    rate: float,
    seconds: float,
    users: int,
    poll: float = 0.005,
) -> Latency:
    """Start a B2 worker (default settings) on an empty file, append at ``rate`` events/s for
    ``seconds``, and poll ``max(_offset)`` of the sink every ``poll`` seconds: a record is
    visible once that reaches its offset (rows commit together with the offset, so all earlier
    records are visible too)."""
    job = "bench_latency"
    res = Latency()
    path = work_dir / "latency.jsonl"
    path.write_bytes(b"")
    create_sink(conn, "B2")
    forget_job(conn, job)
    worker = procs.Child(procs.child_args(dsn, "B2", "file", path, job, forever=True))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the worker holds the partition
        row = _partition(conn, job)
        if row is not None and row[3] is not None:
            break
        if not worker.running():
            res.errors.append(f"worker exited early: {worker.finish().stderr[-500:]}")
            return res
        time.sleep(0.01)
    producer = procs.Child(
        [sys.executable, "-m", "benchmarks.producer", "--path", str(path), "--rate", str(rate),
         "--seconds", str(seconds), "--users", str(users)]
    )  # fmt: skip
    q = f"SELECT max(_offset) FROM {SINK['B2']} WHERE _source = %s AND _partition = '0'"
    polls: list[tuple[float, int]] = []
    produced: procs.ChildResult | None = None
    target: int | None = None
    give_up = time.monotonic() + seconds + 60
    while time.monotonic() < give_up:
        row = conn.execute(q, [STREAM]).fetchone()
        seen = row[0] if row and row[0] is not None else -1
        polls.append((time.time(), seen))
        if produced is None and not producer.running():
            produced = producer.finish()
            ticks = produced.report.get("ticks") or []
            target = ticks[-1][1] if ticks else 0
        if target is not None and seen >= target:
            break
        time.sleep(poll)
    worker.signal(signal.SIGTERM)
    worker.finish()
    if produced is None:
        producer.kill9()
        producer.finish()
        res.errors.append("producer did not finish")
        return res
    ticks = produced.report["ticks"]
    res.events = produced.report["n"]
    res.rate = res.events / produced.report["elapsed"]
    lat: list[float] = []
    i = 0
    for t_written, offset in ticks:
        while i < len(polls) and (polls[i][1] < offset or polls[i][0] < t_written):
            i += 1
        if i == len(polls):
            res.errors.append("some records never became visible")
            break
        lat.append(polls[i][0] - t_written)
    res.p50, res.p99, res.max = percentile(lat, 50), percentile(lat, 99), max(lat, default=0.0)
    ref = reference(path)
    res.errors += _check_sums(conn, ref) + check_job(conn, job, ref, "file")
    return res


def _check_sums(conn: psycopg.Connection[Any], ref: Reference) -> list[str]:
    row = conn.execute(
        f"SELECT count(*), count(DISTINCT id), coalesce(sum(amount_cents), 0), "
        f"coalesce(sum(_offset), 0) FROM {SINK['B2']}"
    ).fetchone()
    want = (ref.n, ref.n, ref.sum_cents, ref.sum_line_starts)
    got = tuple(int(x) for x in row) if row else None
    return [] if got == want else [f"latency run: sink has {got}, expected {want}"]

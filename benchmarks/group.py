"""Does a group of workers share a job and finish sooner? (issue 12, part 4)

An app with two file streams of ``--events`` events each (a B2 map into one append table and
a B1 aggregate into one upsert table per stream) runs to idle three ways, each on a fresh
database: one ``pgstream run`` process, ``run --workers 2``, and two separate ``run``
processes started ``--gap`` seconds apart. For each it reports the wall time (process start
to the last exit, interpreter start-up included) and how many records each worker committed
(from the ledger). ``--repeat`` runs every mode that many times and reports the median.

    python -m benchmarks.group --dsn postgresql://127.0.0.1/postgres --events 500000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.gen import events_file
from pgstream.db.connect import with_database

DB = "pgstream_bench_group"
APP = """
import pgstream as ps

app = ps.App("group_bench")
for name, path in {files!r}:
    s = app.stream(name, ps.FileSource(path))
    s.map(lambda e: {{"id": e["id"], "user_id": e["user"], "amount_cents": e["amount"] * 100}}) \\
        .to_table("facts_" + name)
    s.key_by("user").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("totals_" + name)
"""
DDL = """
CREATE TABLE facts_{s} (id bigint, user_id text, amount_cents bigint, _source text NOT NULL,
    _partition text NOT NULL, _offset bigint NOT NULL, _seq int NOT NULL,
    UNIQUE (_offset, _seq, _source, _partition));
CREATE TABLE totals_{s} ("user" text PRIMARY KEY, n bigint NOT NULL, total bigint);
"""
MODES = ("one", "workers2", "two")


def fresh_database(server_dsn: str) -> str:
    """Drop and create the benchmark database, migrate it, create the sinks; its DSN."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    dsn = with_database(server_dsn, DB)
    subprocess.run(
        [sys.executable, "-m", "pgstream", "db", "upgrade", "--dsn", dsn],
        check=True, capture_output=True,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in ("a", "b"):
            conn.execute(DDL.format(s=s).encode())
    return dsn


def run_mode(mode: str, dsn: str, workdir: Path, gap: float) -> tuple[float, list[int]]:
    """Run the app to idle in ``mode``; (wall seconds, records per worker, largest first)."""
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    base = [sys.executable, "-m", "pgstream", "run", "groupapp:app", "--dsn", dsn,
            "--stop-when-idle", "--progress-interval", "0"]
    started = time.monotonic()
    if mode == "one":
        procs = [subprocess.Popen(base, env=env, cwd=workdir, stderr=subprocess.DEVNULL)]
    elif mode == "workers2":
        procs = [subprocess.Popen([*base, "--workers", "2"], env=env, cwd=workdir,
                                  stderr=subprocess.DEVNULL)]
    else:
        procs = [subprocess.Popen(base, env=env, cwd=workdir, stderr=subprocess.DEVNULL)]
        time.sleep(gap)
        procs.append(subprocess.Popen(base, env=env, cwd=workdir, stderr=subprocess.DEVNULL))
    codes = [p.wait(600) for p in procs]
    wall = time.monotonic() - started
    if any(codes):
        raise SystemExit(f"{mode}: exit codes {codes}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT sum(records_in) FROM pgstream.batches GROUP BY worker ORDER BY 1 DESC"
        ).fetchall()
    return wall, [int(r[0]) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGSTREAM_TEST_DSN",
                                                       "postgresql://127.0.0.1/postgres"))
    parser.add_argument("--events", type=int, default=500_000, help="events per stream")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between the two runs")
    parser.add_argument("--data-dir", type=Path, default=Path(".bench-data"))
    args = parser.parse_args(argv)
    files = [(s, str(events_file(args.data_dir / s, args.events, 1000, seed)))
             for s, seed in (("a", 1), ("b", 2))]
    results: dict[str, list[tuple[float, list[int]]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "groupapp.py").write_text(textwrap.dedent(APP.format(files=files)))
        for i in range(args.repeat):
            for mode in MODES:
                dsn = fresh_database(args.dsn)
                wall, split = run_mode(mode, dsn, workdir, args.gap)
                results[mode].append((wall, split))
                print(f"run {i + 1} {mode:>8}: {wall:6.2f}s  records per worker {split}",
                      flush=True)
    print(report(results, args.events))
    return 0


def report(results: dict[str, list[tuple[float, list[int]]]], events: int) -> str:
    """Median wall time per mode, the speed-up over one worker and the records' split."""
    one = statistics.median(w for w, _ in results["one"])
    lines = [f"two streams x {events:,} events, median of {len(results['one'])}:"]
    for mode, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        splits: list[Any] = [s for _, s in runs]
        lines.append(f"  {mode:>8}: {wall:6.2f}s  x{one / wall:4.2f} vs one  splits {splits}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

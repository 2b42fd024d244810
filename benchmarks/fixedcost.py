"""The fixed cost of a run: ``pgstream run APP --stop-when-idle`` over a one-line file.

Everything a run pays whatever its input: interpreter start-up, imports, connecting, the
schema, source and sink checks, registering and claiming the partition, one batch and the
idle decision. Each run is a fresh process started with ``python -X importtime``, so one run
gives both its wall time and its imports (the sum of the top-level imports it reported);
the best of ``repeat`` runs counts (a noisy machine only ever adds time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.procs import ROOT
from benchmarks.workloads import forget_job

JOB = "bench_fixed_cost"
SINK_TABLE = "bench_fixed_cost"
APP_MODULE = "bench_fixed_cost_app"
_APP = f"""\
import pgstream as ps

app = ps.App({JOB!r})
app.stream("events", ps.FileSource({{path!r}})).key_by("user").aggregate(
    n=ps.count(), total=ps.sum("amount")
).to_table({SINK_TABLE!r})
"""


@dataclass(slots=True)
class FixedCost:
    """The best run's wall time and imports, and the interpreter's bare start-up."""

    wall: float = 0.0  # the whole process, from exec to exit
    imports: float = 0.0  # pgstream's and its libraries' imports in that run
    interpreter: float = 0.0  # ``python -c pass``
    runs: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rest(self) -> float:
        """Connecting, checks, claim, the batch and the idle decision."""
        return max(0.0, self.wall - self.imports - self.interpreter)

    def __str__(self) -> str:
        return (
            f"{self.wall:.3f} s wall = interpreter {self.interpreter:.3f} s + imports "
            f"{self.imports:.3f} s + connect, checks, claim, batch and idle decision "
            f"{self.rest:.3f} s (best of {len(self.runs)})"
        )


def top_level_imports(stderr: str) -> float:
    """Seconds spent in the imports ``-X importtime`` reported at the top level."""
    total = 0
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line.split("|")
        if len(parts) == 3 and parts[2].startswith(" ") and not parts[2].startswith("  "):
            try:
                total += int(parts[1])
            except ValueError:  # the header line
                continue
    return total / 1e6


def _timed(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    return time.perf_counter() - started, done


def measure(conn: psycopg.Connection[Any], dsn: str, work_dir: Path, repeat: int) -> FixedCost:
    """Run the one-line job ``repeat`` times from scratch; the best run counts."""
    data = work_dir / "one.jsonl"
    data.write_text('{"id": 1, "user": "u1", "amount": 5}\n')
    (work_dir / f"{APP_MODULE}.py").write_text(_APP.format(path=str(data)))
    conn.execute(f"DROP TABLE IF EXISTS {SINK_TABLE}")
    conn.execute(
        f'CREATE TABLE {SINK_TABLE} ("user" text PRIMARY KEY, n bigint NOT NULL, total bigint)'
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(work_dir), str(ROOT)]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode cached
    run = [sys.executable, "-X", "importtime", "-m", "pgstream", "run", f"{APP_MODULE}:app",
           "--stop-when-idle", "--dsn", dsn]  # fmt: skip
    result = FixedCost()
    best: tuple[float, float] | None = None
    for _ in range(repeat):
        forget_job(conn, JOB)
        conn.execute(f"TRUNCATE {SINK_TABLE}")
        wall, done = _timed(run, env)
        if done.returncode != 0:
            result.errors.append(f"run failed: {done.stderr[-800:]}")
            break
        row = conn.execute(f"SELECT n FROM {SINK_TABLE}").fetchall()
        if row != [(1,)]:
            result.errors.append(f"the one-line run left {row} in its sink")
        result.runs.append(wall)
        if best is None or wall < best[0]:
            best = (wall, top_level_imports(done.stderr))
    result.interpreter = min(_timed([sys.executable, "-c", "pass"], env)[0] for _ in range(3))
    if best is not None:
        result.wall, result.imports = best
    forget_job(conn, JOB)
    return result

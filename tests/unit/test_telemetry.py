"""The metric names, the Grafana dashboard that uses them, and the JSON log formatter."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from pgstream.telemetry.logs import JsonFormatter
from pgstream.telemetry.metrics import METRICS, MetricsObserver

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pgstream.json"
NAMES = {name for name, *_ in METRICS}


def test_every_metric_is_named_pgstream_and_registered_as_listed() -> None:
    observer = MetricsObserver()
    families = {f.name: f for f in observer.registry.collect()}
    for name, kind, _labels, _ in METRICS:
        assert name.startswith("pgstream_")
        family = families[name.removesuffix("_total")]
        assert family.type == kind
    assert len(families) == len(METRICS)


def _exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_the_dashboard_uses_every_metric_and_only_those() -> None:
    used = set()
    for expr in _exprs():
        for found in re.findall(r"\bpgstream_[a-z_]+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", found)
            assert base in NAMES, f"{expr} uses {found}, which pgstream does not export"
            used.add(base)
    assert used == NAMES


def test_the_dashboard_filters_every_query_by_the_job_variable() -> None:
    for expr in _exprs():
        assert 'job=~"$job"' in expr, expr


def test_json_log_lines_carry_the_context_and_the_error() -> None:
    formatter = JsonFormatter(worker="2/3")
    formatter.context["job"] = "shop"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "pgstream.task", logging.WARNING, __file__, 1, "retrying %s", ("x",), sys.exc_info()
        )
    record.stream, record.partition = "orders", "0"
    line = json.loads(formatter.format(record))
    assert line["message"] == "retrying x" and line["level"] == "warning"
    assert line["logger"] == "pgstream.task"
    assert (line["job"], line["worker"], line["stream"], line["partition"]) == (
        "shop", "2/3", "orders", "0"
    )
    assert "ValueError: boom" in line["error"]
    assert line["time"].endswith("+00:00")
    assert "\n" not in formatter.format(record)


@pytest.mark.parametrize("reason", ["taken over", "orders/0: epoch 3 or plan version 1 is stale"])
def test_fencing_is_counted_by_where_it_happened(reason: str) -> None:
    from pgstream.runtime.leases import Lease

    observer = MetricsObserver()
    observer.started("shop", 1, 1)
    lease = Lease("orders", "0", 3, 10, 0)
    observer.claimed(lease)
    observer.fenced(lease, reason)
    where = "renewal" if reason == "taken over" else "batch"
    value = observer.registry.get_sample_value(
        "pgstream_fencing_rejections_total", {"job": "shop", "stream": "orders", "where": where}
    )
    assert value == 1
    owned = observer.registry.get_sample_value("pgstream_owned_partitions", {"job": "shop"})
    assert owned == 0
    offset = observer.registry.get_sample_value(
        "pgstream_committed_offset", {"job": "shop", "stream": "orders", "partition": "0"}
    )
    assert offset is None  # a partition no longer held has no gauge


def test_takeovers_and_rebalances_are_counted_apart_from_claims_and_releases() -> None:
    from pgstream.runtime.leases import Lease

    observer = MetricsObserver()
    observer.started("shop", 1, 3)
    observer.claimed(Lease("orders", "0", 1, None, 0))  # a free row
    observer.claimed(Lease("orders", "1", 4, 10, 0, taken_from="w1"))  # its owner died
    handed = Lease("orders", "2", 2, 5, 0)
    observer.claimed(handed)
    observer.released(handed)
    observer.handed_over(handed)
    observer.released(Lease("orders", "0", 1, None, 0))  # stopping: no rebalance

    def count(name: str) -> float | None:
        return observer.registry.get_sample_value(name, {"job": "shop", "stream": "orders"})

    assert count("pgstream_partition_claims_total") == 3
    assert count("pgstream_takeovers_total") == 1
    assert count("pgstream_partition_releases_total") == 2
    assert count("pgstream_rebalances_total") == 1

"""The audit of one job: read its checkpoint in one snapshot, replay every partition, compare
every sink."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.sinks.append import AppendSink
from pgstream.sinks.upsert import UpsertSink
from pgstream.verify.compare import (
    compare_aggregate,
    compare_append,
    compare_dead,
    compare_fold,
    compare_late,
    compare_states,
)
from pgstream.verify.expected import Expected
from pgstream.verify.handover import compare_handed_over, pruned_streams
from pgstream.verify.judge import load_judge
from pgstream.verify.ledger import (
    count_redriven,
    load_dead_letters,
    load_partitions,
    load_skips,
)
from pgstream.verify.report import CannotVerify, VerifyReport
from pgstream.verify.reread import audit_partition

#: records re-read per query
CHUNK = 10_000


def verify_app(app: App, dsn: str, *, chunk: int = CHUNK) -> VerifyReport:
    """Audit ``app``'s job in the database at ``dsn``.

    Returns the report (``ok`` / ``violations``); raises :class:`CannotVerify` when the audit
    cannot be carried out (schema missing, a source that no longer holds the committed range,
    a sink table that is gone, ...).
    """
    started = time.monotonic()
    report = VerifyReport(job=app.name)
    with _snapshot(dsn) as conn:
        sinks = _bind_sinks(conn, app)
        judge = load_judge(conn, app)
        dead_rows = load_dead_letters(conn, app.name)
        report.skipped = load_skips(conn, app.name)
        report.redriven = count_redriven(conn, app.name)
        expected = Expected()
        committed_of: dict[tuple[str, str], int | None] = {}
        parts = load_partitions(conn, app)
        report.partitions = len(parts)
        pruned = pruned_streams(app)
        for stream, spec in pruned.items():
            why = f"its repartition {stream!r} prunes consumed rows (fold(..., prune=True))"
            expected.unchecked_tables[spec.table] = why
            report.unchecked.append(f"fold sink {spec.table}: {why}, so it cannot be replayed")
        for p in parts:
            committed_of[(p.source, p.partition)] = p.committed
            source = app.sources.get(p.source)
            if source is None:
                # an orphan: the stream left the code; its sinks are not the app's to check
                dead_rows.pop((p.source, p.partition), None)
                report.unchecked.append(
                    f"stream {p.source!r} (partition {p.partition}) is no longer in the app: its "
                    f"checkpoint and outputs are not checked; retire it with `pgstream job retire "
                    f"MODULE:APP --stream {p.source}`"
                )
                continue
            stored = dead_rows.get((p.source, p.partition), {})
            if p.source in pruned:
                continue
            audit_partition(
                conn, app, dsn, source, p, sinks, stored, expected, report, chunk, judge
            )
        _compare_sinks(conn, app, expected, committed_of, report)
        compare_dead(dead_rows, expected, committed_of, report)
        compare_late(conn, app, expected, committed_of, report)
        report.unchecked.extend(judge.notes(expected))
        if app.handlers:
            report.unchecked.append(
                "@app.batch handlers write user SQL that verify cannot recompute: "
                + ", ".join(h.name for h in app.handlers)
            )
        conn.rollback()
    report.elapsed = time.monotonic() - started
    return report


def _snapshot(dsn: str) -> psycopg.Connection[Any]:
    """A connection to a migrated database whose next transaction is a read-only
    REPEATABLE READ snapshot."""
    from pgstream.db.connect import connect
    from pgstream.db.migrate import ensure_migrated

    try:
        conn = connect(dsn, autocommit=False)
    except Exception as exc:
        raise CannotVerify(f"cannot connect: {str(exc).strip().splitlines()[0]}") from exc
    try:
        ensure_migrated(conn)
        conn.rollback()
    except Exception as exc:
        conn.close()
        raise CannotVerify(str(exc).strip().splitlines()[0]) from exc
    try:
        conn.execute(queries.VERIFY_SNAPSHOT)
    except BaseException:
        conn.close()
        raise
    return conn


def _bind_sinks(conn: psycopg.Connection[Any], app: App) -> dict[str, AppendSink | UpsertSink]:
    """The app's sinks, bound to (and validated against) their tables."""
    from pgstream.runtime.worker import build_sinks

    sinks = build_sinks(app)
    for sink in sinks.values():
        try:
            sink.bind(conn)
        except Exception as exc:
            raise CannotVerify(f"sink table: {str(exc).strip().splitlines()[0]}") from exc
    return sinks


def _compare_sinks(
    conn: psycopg.Connection[Any],
    app: App,
    expected: Expected,
    committed_of: dict[tuple[str, str], int | None],
    report: VerifyReport,
) -> None:
    """Every sink table that can be checked, by its kind, then the fold states."""
    for spec in _unique_tables(app.sinks):
        if spec.table in expected.unchecked_tables:
            continue
        if spec.kind == "append":
            compare_append(conn, app, spec.table, expected, committed_of, report)
        elif spec.kind == "aggregate":
            compare_aggregate(conn, spec, expected, report)
        else:
            compare_fold(conn, spec, expected, report)
    for spec in app.sinks:
        if spec.repartition is not None:
            compare_handed_over(conn, app, spec, expected, committed_of, report)
    compare_states(conn, app, expected, report)


def _unique_tables(specs: list[SinkSpec]) -> list[SinkSpec]:
    seen: set[str] = set()
    out = []
    for s in specs:
        if s.table not in seen:
            seen.add(s.table)
            out.append(s)
    return out

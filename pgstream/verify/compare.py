"""Comparisons per sink kind: the stored rows of append, aggregate and fold sinks, fold state
and dead letters against what the replay expects."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql

from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.operators.keys import KeySpec
from pgstream.runtime.sinkplans import aggregate_row
from pgstream.sinks.append import META_COLUMNS, Position
from pgstream.sinks.introspect import load_table
from pgstream.verify.expected import Expected
from pgstream.verify.judge import in_ranges
from pgstream.verify.report import CannotVerify, VerifyReport, Violation
from pgstream.verify.values import norm_key, show, values_equal

#: an expected append output: its columns and values
Output = tuple[tuple[str, ...], tuple[Any, ...]]


def _fetch(
    conn: psycopg.Connection[Any], query: sql.Composed, params: list[Any], name: str
) -> Iterator[tuple[Any, ...]]:
    """Stream a query's rows through a server-side cursor."""
    with conn.cursor(name=name) as cur:
        cur.itersize = 5000
        cur.execute(query, params)
        yield from cur


def compare_append(
    conn: psycopg.Connection[Any],
    app: App,
    table: str,
    expected: Expected,
    committed_of: dict[tuple[str, str], int | None],
    report: VerifyReport,
) -> None:
    """Every stored row of append sink ``table`` once at its position with its values, none at
    or above its partition's committed offset, none missing."""
    exp = expected.plans.rows.get(table, {})
    sources = sorted({s.stream for s in app.sinks if s.table == table})
    cols = sorted({c for shape, _ in exp.values() for c in shape})
    check = _AppendCheck(table, exp, expected.skip_append.get(table, {}), committed_of, cols)
    for row in _sink_rows(conn, table, META_COLUMNS, cols, sources):
        check.row(row, report)
    report.append_rows += check.n_rows
    for key in exp.keys() - check.seen:
        s, p, off, seq = key
        report.violations.append(
            Violation("lost", table, s, p, off, detail=f"_seq {seq}: output missing from the sink")
        )


class _AppendCheck:
    """The judgement of an append sink's stored rows, one at a time."""

    def __init__(
        self,
        table: str,
        exp: dict[Position, Output],
        skip: dict[tuple[str, str], list[tuple[int, int]]],
        committed_of: dict[tuple[str, str], int | None],
        cols: list[str],
    ) -> None:
        self.table = table
        self.exp = exp
        self.skip = skip
        self.committed_of = committed_of
        self.col_idx = {c: i + len(META_COLUMNS) for i, c in enumerate(cols)}
        # expected rows grouped by record, to tell a duplicate from an unexpected row
        self.by_record: dict[tuple[str, str, int], list[Output]] = defaultdict(list)
        for (s, p, off, _seq), shape_vals in exp.items():
            self.by_record[(s, p, off)].append(shape_vals)
        self.seen: set[Position] = set()
        self.n_rows = 0

    def row(self, row: tuple[Any, ...], report: VerifyReport) -> None:
        """Judge one stored row (its position first, then the output's columns)."""
        self.n_rows += 1
        s, p, off, seq = row[0], row[1], int(row[2]), int(row[3])
        key: Position = (s, p, off, seq)
        where = {"sink": self.table, "source": s, "partition": p, "offset": off}
        committed = self.committed_of.get((s, p))
        if committed is None or off >= committed:
            report.violations.append(
                Violation("unexpected", detail=f"_seq {seq}: a row at or above the committed "
                          f"offset ({committed})", **where)
            )
            return
        if in_ranges(self.skip.get((s, p)), off):
            self.n_rows -= 1  # ran under another plan: not checked (listed in the report's notes)
            return
        if key in self.seen:
            report.violations.append(
                Violation("duplicated", detail=f"_seq {seq} appears twice", **where)
            )
            return
        want = self.exp.get(key)
        if want is None:
            twins = [
                sv for sv in self.by_record.get((s, p, off), [])
                if _row_matches(sv, row, self.col_idx)
            ]
            kind = "duplicated" if twins else "unexpected"
            why = (
                f"_seq {seq} repeats another output of this record"
                if twins
                else f"_seq {seq}: the operators produce no such output"
            )
            report.violations.append(Violation(kind, detail=why, **where))
            return
        self.seen.add(key)
        if not _row_matches(want, row, self.col_idx):
            shape, vals = want
            got = {c: row[self.col_idx[c]] for c in shape}
            report.violations.append(
                Violation("wrong-value", detail=f"_seq {seq}: expected "
                          f"{show(dict(zip(shape, vals)))}, found {show(got)}", **where)
            )


def _row_matches(want: Output, row: tuple[Any, ...], col_idx: dict[str, int]) -> bool:
    shape, vals = want
    got = tuple([row[col_idx[c]] for c in shape])
    if got == vals:  # the common case; == implies values_equal for every type involved
        return True
    return all(values_equal(v, g) for v, g in zip(vals, got))


def _sink_rows(
    conn: psycopg.Connection[Any],
    table: str,
    key_cols: tuple[str, ...],
    cols: list[str],
    sources: list[str] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """The ``key_cols`` and ``cols`` of every row of sink ``table`` (of an append sink: of the
    rows from ``sources``)."""
    info = load_table(conn, table)
    missing = [c for c in cols if c not in info.columns]
    if missing:
        raise CannotVerify(f"sink table {info.label} has no column(s) {', '.join(missing)}")
    select = sql.SQL(", ").join(sql.Identifier(c) for c in (*key_cols, *cols))
    if sources is None:
        query = sql.SQL("SELECT {} FROM {}").format(select, info.ident)
        return _fetch(conn, query, [], "pgstream_verify_keyed")
    query = sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s)").format(
        select, info.ident, sql.Identifier(META_COLUMNS[0])
    )
    return _fetch(conn, query, [sources], "pgstream_verify_append")


def _keyed_rows(
    conn: psycopg.Connection[Any],
    table: str,
    key_cols: tuple[str, ...],
    cols: list[str],
    report: VerifyReport,
) -> Iterator[tuple[tuple[Any, ...], str, tuple[Any, ...]]]:
    """Every row of keyed sink ``table`` (counted in ``report``) as its normalized key, its
    key as shown in a violation, and its ``cols``."""
    width = len(key_cols)
    for row in _sink_rows(conn, table, key_cols, cols):
        report.keyed_rows += 1
        yield norm_key(row[:width]), show(row[:width] if width > 1 else row[0]), row[width:]


def _report_lost(report: VerifyReport, spec: SinkSpec, keys: Iterable[tuple[Any, ...]]) -> None:
    """A ``lost`` violation for each key (its column values) the sink has no row of."""
    for kvals in keys:
        report.violations.append(
            Violation("lost", spec.table, spec.stream,
                      key=show(kvals if len(kvals) > 1 else kvals[0]),
                      detail="no row for this key")
        )


def compare_aggregate(
    conn: psycopg.Connection[Any], spec: SinkSpec, expected: Expected, report: VerifyReport
) -> None:
    """Every key's stored aggregates equal every batch's deltas merged; no key missing or extra."""
    assert spec.key is not None
    key: KeySpec = spec.key
    table = spec.table
    aggs = spec.aggregates
    cols = [c for a in aggs for c in a.columns()]
    want: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Any, ...]]] = {}
    width = len(key.columns)
    for k, acc in expected.plans.accumulators.get(table, {}).items():
        row = aggregate_row(key, aggs, k, acc)
        want[norm_key(row[:width])] = (row[:width], row[width:])
    seen: set[tuple[Any, ...]] = set()
    for nk, label, values in _keyed_rows(conn, table, key.columns, cols, report):
        item = want.get(nk)
        if item is None:
            report.violations.append(
                Violation("unexpected", table, spec.stream, key=label,
                          detail=f"no input has this key; row {show(values)}")
            )
            continue
        seen.add(nk)
        diffs = [
            f"{c}: expected {show(e)}, found {show(a)}"
            for c, e, a in zip(cols, item[1], values)
            if not values_equal(e, a)
        ]
        if diffs:
            report.violations.append(
                Violation("wrong-value", table, spec.stream, key=label, detail="; ".join(diffs))
            )
    _report_lost(report, spec, (want[nk][0] for nk in want.keys() - seen))


def compare_fold(
    conn: psycopg.Connection[Any], spec: SinkSpec, expected: Expected, report: VerifyReport
) -> None:
    """Every key's stored fold columns equal its replayed state (in one of its partitions)."""
    assert spec.key is not None
    table = spec.table
    key_cols = spec.key.columns
    want: dict[tuple[Any, ...], dict[str, tuple[Any, Any]]] = {}
    for (partition, _kj), (kvals, state) in expected.plans.folds.get(table, {}).items():
        want.setdefault(norm_key(kvals), {})[partition] = (kvals, state)
    cols: set[str] = set()
    for per_part in want.values():
        for _k, state in per_part.values():
            cols.update(state.keys() if isinstance(state, dict) else ("value",))
    ordered = sorted(cols)
    seen: set[tuple[Any, ...]] = set()
    for nk, label, values in _keyed_rows(conn, table, key_cols, ordered, report):
        found = want.get(nk)
        if found is None:
            report.violations.append(
                Violation("unexpected", table, spec.stream, key=label,
                          detail="no input has this key")
            )
            continue
        seen.add(nk)
        stored = dict(zip(ordered, values))
        candidates = []
        for _k, state in found.values():
            fields = state if isinstance(state, dict) else {"value": state}
            candidates.append(fields)
            if all(values_equal(v, stored[c]) for c, v in fields.items()):
                break
        else:
            got = {c: stored[c] for c in candidates[0]}
            report.violations.append(
                Violation("wrong-value", table, spec.stream, key=label,
                          detail=f"expected {show(candidates[0])}, found {show(got)}")
            )
    _report_lost(report, spec, want.keys() - seen)


def compare_states(
    conn: psycopg.Connection[Any], app: App, expected: Expected, report: VerifyReport
) -> None:
    """``pgstream.state`` holds exactly the replayed fold states."""
    operators = sorted(
        {
            s.operator_id
            for s in app.sinks
            if (s.kind == "fold" or (s.window is not None and s.window.keeps_state))
            and s.table not in expected.unchecked_tables
        }
    )
    if not operators:
        return
    seen: set[tuple[str, str, str]] = set()
    for op, part, key, value in conn.execute(
        queries.VERIFY_STATES, {"job": app.name, "operators": operators}
    ):
        k = (op, part, key)
        if k not in expected.plans.states:
            report.violations.append(
                Violation("unexpected", "pgstream.state", "-", part, key=f"{op} {key}",
                          detail="state for a key no committed input touched")
            )
            continue
        seen.add(k)
        want = expected.plans.states[k]
        if not values_equal(want, value):
            report.violations.append(
                Violation("wrong-value", "pgstream.state", "-", part, key=f"{op} {key}",
                          detail=f"expected {show(want)}, found {show(value)}")
            )
    for op, part, key in expected.plans.states.keys() - seen:
        report.violations.append(
            Violation("lost", "pgstream.state", "-", part, key=f"{op} {key}",
                      detail="operator state missing")
        )


def compare_dead(
    dead_rows: dict[tuple[str, str], dict[int, str]],
    expected: Expected,
    committed_of: dict[tuple[str, str], int | None],
    report: VerifyReport,
) -> None:
    """Dead letters exactly for the records that fail, none at or above the committed offset."""
    sink = "pgstream.dead_letters"
    for (s, p), offsets in dead_rows.items():
        committed = committed_of.get((s, p))
        must = expected.dead.get((s, p), set())
        report.dead_letters += len(offsets)
        for off, op in offsets.items():
            if committed is None or off >= committed:
                report.violations.append(
                    Violation("unexpected", sink, s, p, off,
                              detail=f"dead letter ({op}) at or above the committed offset "
                              f"({committed})")
                )
            elif off not in must:
                report.violations.append(
                    Violation("unexpected", sink, s, p, off,
                              detail=f"dead letter ({op}) for a record the operators accept "
                              "(after a fix: `pgstream dlq redrive` applies it)")
                )
    for (s, p), failing in expected.dead.items():
        have = dead_rows.get((s, p), {})
        for off in sorted(failing - have.keys()):
            report.violations.append(
                Violation("lost", sink, s, p, off, detail="the record fails in the operators "
                          "but has no dead letter")
            )


def compare_late(
    conn: psycopg.Connection[Any],
    app: App,
    expected: Expected,
    committed_of: dict[tuple[str, str], int | None],
    report: VerifyReport,
) -> None:
    """``pgstream.late_records`` holds exactly the records the window rules call late (by the
    replayed watermarks), each once, none at or above its partition's committed offset."""
    want = expected.plans.late
    checked = {
        s.operator_id
        for s in app.sinks
        if s.window is not None and s.table not in expected.unchecked_tables
    }
    sink = "pgstream.late_records"
    seen: dict[str, set[tuple[str, str, int, int, float]]] = defaultdict(set)
    for op, src, part, off, seq, start, t, mark in conn.execute(
        queries.VERIFY_LATE_RECORDS, {"job": app.name}
    ):
        if op not in checked:
            continue
        report.late_records += 1
        key = (src, part, int(off), int(seq), start.timestamp())
        committed = committed_of.get((src, part))
        item = want.get(op, {}).get(key)
        if item is None or key in seen[op]:
            above = committed is None or off >= committed
            why = "at or above the committed offset" if above else "for a record on time"
            if item is not None:
                why = "twice"
            report.violations.append(
                Violation("unexpected", sink, src, part, off,
                          key=f"{op} window {show(start)}", detail=f"late record {why}")
            )
            continue
        seen[op].add(key)
        exp_t, exp_mark = item
        if abs(t.timestamp() - exp_t) > 1e-3 or abs(mark.timestamp() - exp_mark) > 1e-3:
            report.violations.append(
                Violation("wrong-value", sink, src, part, off, key=f"{op} window {show(start)}",
                          detail=f"event time/watermark {show(t)}/{show(mark)}, expected "
                          f"{exp_t}/{exp_mark} (epoch s)")
            )
    for op, records in want.items():
        if op not in checked:
            continue
        for key in records.keys() - seen[op]:
            src, part, off, _seq, start = key
            report.violations.append(
                Violation("lost", sink, src, part, off, key=f"{op} window {start}",
                          detail="the record is late by the window rules but has no late record")
            )

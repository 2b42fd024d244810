"""``pgstream verify``: audit a job's exactly-once invariants against its own sources.

What is checked, per (source, partition) of the job:

1. **Ledger.** ``pgstream.batches`` tiles ``[initial offset, committed_offset)`` with no gap
   and no overlap, and its last batch ends exactly at ``partitions.committed_offset``
   (kinds ``ledger-gap`` / ``ledger-overlap``). Each batch's ``records_in`` equals the
   number of records the source holds in its range (more: the runtime skipped records,
   ``lost``; fewer: the source no longer holds the range, so it cannot be checked).
2. **One effect per record.** The source is re-read over the committed range and every
   ledger batch is re-evaluated through the app's own operators
   (:meth:`pgstream.runtime.pipeline.Pipeline.evaluate`, folds replayed from empty state).
   The result must be exactly the rows in each append sink, compared on
   ``(_source, _partition, _offset, _seq)`` and values, plus the dead letters, each once.
   Dead letters written by the runtime itself (a record the sink rejected, or one that
   kept killing the worker) stand for their record.
3. **Nothing above the committed offset.** No append row or dead letter has an offset at
   or above its partition's committed offset.
4. **Keyed results.** Keyed aggregates equal a recomputation from the source; fold sinks
   and ``pgstream.state`` equal a replay of the folds (numbers compared with a tolerance).

Each batch is judged by the plan it ran under (``batches.plan_version``, see
:mod:`pgstream.plan`). A sink that batch's plan did not have expects nothing from it (a sink
added later holds only the effects of later batches, aggregates included). A sink whose
plan entry differs from the app's (changed code, key, aggregates) cannot be checked over
that batch: an append sink's rows in its range are skipped, a keyed sink is not checked at
all (its rows mix both plans), and the report lists every such range as "not checked"
(``unchecked``) instead of reporting violations. So do batches from before the job's plan
was recorded.

Violations have a kind: ``lost``, ``duplicated``, ``unexpected``, ``wrong-value``,
``ledger-gap`` or ``ledger-overlap``. All database reads run in one REPEATABLE READ
snapshot, so a live job can be verified while it runs.

Exit codes of the command: 0 clean, 1 violations, 2 cannot check (the reason is printed).
"""

from __future__ import annotations

import bisect
import copy
import datetime as dt
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg import sql

from pgstream import plan as plans
from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.keys import KeySpec
from pgstream.runtime.pipeline import Pipeline
from pgstream.sources.base import OpenContext, PartitionReader, Source, SourceError, SourceRecord
from pgstream.sources.table import MIN_OFFSET, TableReader
from pgstream.state.store import KeyedState

__all__ = [
    "KINDS",
    "CannotVerify",
    "VerifyReport",
    "Violation",
    "values_equal",
    "verify_app",
]

KINDS = ("lost", "duplicated", "unexpected", "wrong-value", "ledger-gap", "ledger-overlap")

#: dead letters the runtime writes itself (not produced by re-evaluating the operators)
RUNTIME_DEAD_OPERATORS = frozenset({"sink", "worker"})

REL_TOL = 1e-6
ABS_TOL = 1e-6
CHUNK = 10_000
READ_TIMEOUT = 30.0

AppendKey = tuple[str, str, int, int]


class CannotVerify(Exception):
    """The audit cannot be carried out (exit code 2); the message says why."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant."""

    kind: str
    sink: str
    source: str = "-"
    partition: str = "-"
    offset: int | None = None
    key: str | None = None
    detail: str = ""

    def describe(self) -> str:
        """One report line."""
        where = f"{self.source}/{self.partition}"
        at = f" offset {self.offset}" if self.offset is not None else ""
        key = f" key {self.key}" if self.key is not None else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.kind:<14} {self.sink} {where}{at}{key}{detail}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "kind": self.kind,
            "sink": self.sink,
            "source": self.source,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "detail": self.detail,
        }


@dataclass(slots=True)
class VerifyReport:
    """The outcome of :func:`verify_app`."""

    job: str
    violations: list[Violation] = field(default_factory=list)
    partitions: int = 0
    records: int = 0
    batches: int = 0
    append_rows: int = 0
    dead_letters: int = 0
    keyed_rows: int = 0
    unchecked: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """No violation found."""
        return not self.violations

    @property
    def exit_code(self) -> int:
        """0 clean, 1 violations."""
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        """Violations per kind (every kind present, zeros included)."""
        c = Counter(v.kind for v in self.violations)
        return {k: c.get(k, 0) for k in KINDS}

    def summary(self) -> str:
        """One line: what was checked and the verdict."""
        verdict = "clean" if self.ok else f"{len(self.violations)} violation(s)"
        kinds = ", ".join(f"{k}={n}" for k, n in self.counts().items() if n)
        return (
            f"verify {self.job}: {verdict}{' (' + kinds + ')' if kinds else ''}; "
            f"{self.partitions} partition(s), {self.records} records in {self.batches} batches, "
            f"{self.append_rows} append rows, {self.dead_letters} dead letters, "
            f"{self.keyed_rows} keyed rows checked in {self.elapsed:.2f}s"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "job": self.job,
            "ok": self.ok,
            "counts": self.counts(),
            "partitions": self.partitions,
            "records": self.records,
            "batches": self.batches,
            "append_rows": self.append_rows,
            "dead_letters": self.dead_letters,
            "keyed_rows": self.keyed_rows,
            "unchecked": self.unchecked,
            "elapsed": round(self.elapsed, 3),
            "violations": [v.as_dict() for v in self.violations],
        }


# -- value comparison ----------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, Decimal)) and not isinstance(v, bool)


def _numbers_close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, Decimal)) and isinstance(b, (int, Decimal)):
        return bool(a == b)
    fa, fb = float(a), float(b)
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    return math.isclose(fa, fb, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _parse_time(text: str) -> dt.datetime | dt.date | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            return None


def values_equal(expected: Any, actual: Any) -> bool:
    """Does the stored ``actual`` hold the operator output ``expected``?

    Numbers compare with a tolerance (floats summed in another order), ISO strings match
    timestamps, JSON compares structurally.
    """
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, bool) or isinstance(actual, bool):
        return bool(expected == actual)
    if _is_number(expected) and _is_number(actual):
        return _numbers_close(expected, actual)
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            values_equal(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(
            values_equal(e, a) for e, a in zip(expected, actual)
        )
    if isinstance(expected, str) and isinstance(actual, (dt.date, dt.datetime)):
        parsed = _parse_time(expected)
        return parsed is not None and _times_equal(parsed, actual)
    if isinstance(expected, (dt.date, dt.datetime)) and isinstance(actual, (dt.date, dt.datetime)):
        return _times_equal(expected, actual)
    if isinstance(expected, str) and isinstance(actual, (uuid.UUID, Decimal)):
        return expected == str(actual)
    if isinstance(expected, uuid.UUID) and isinstance(actual, str):
        return str(expected) == actual
    if isinstance(expected, bytes) and isinstance(actual, (bytes, memoryview)):
        return expected == bytes(actual)
    return bool(expected == actual)


def _times_equal(a: dt.date | dt.datetime, b: dt.date | dt.datetime) -> bool:
    if isinstance(a, dt.datetime) and isinstance(b, dt.datetime):
        if (a.tzinfo is None) != (b.tzinfo is None):
            a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
        return a == b
    return a == b


def _norm_key_part(v: Any) -> Any:
    """A hashable, type-tolerant form of one key column value (5, 5.0 and Decimal(5) agree)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, Decimal)):
        return int(v) if v == int(v) else float(v)
    if isinstance(v, float):
        return int(v) if v.is_integer() else v
    if isinstance(v, dt.datetime):
        return (v.astimezone(dt.timezone.utc) if v.tzinfo else v).isoformat()
    if isinstance(v, (dt.date, uuid.UUID)):
        return str(v)
    if isinstance(v, (dict, list)):
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    if isinstance(v, memoryview):
        return bytes(v)
    return v


def _norm_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_norm_key_part(v) for v in values)


def _show(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- accumulator merging (mirrors the SQL merge of batch deltas) ----------------------------


def _merge_acc(agg: Aggregate, a: Any, b: Any) -> Any:
    kind = agg.kind
    if kind == "count":
        return a + b
    if kind == "avg":
        (ta, na), (tb, nb) = a, b
        total = tb if ta is None else ta if tb is None else ta + tb
        return (total, na + nb)
    if a is None:
        return b
    if b is None:
        return a
    if kind == "sum":
        return a + b
    if kind == "min":
        return b if b < a else a
    return b if b > a else a


# -- the audit --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Partition:
    source: str
    partition: str
    committed: int | None
    epoch: int


@dataclass(slots=True)
class _Expected:
    """What re-evaluation says every sink must hold."""

    # append table -> position -> (columns, values)
    append: dict[str, dict[AppendKey, tuple[tuple[str, ...], tuple[Any, ...]]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    # aggregate table -> key -> accumulators
    aggregates: dict[str, dict[Any, list[Any]]] = field(default_factory=lambda: defaultdict(dict))
    # fold table -> normalized key -> {partition: (key, state)}
    folds: dict[str, dict[tuple[Any, ...], dict[str, tuple[Any, Any]]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    # (operator id, partition, json key) -> state
    states: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    # (source, partition) -> offsets that must be dead letters
    dead: dict[tuple[str, str], set[int]] = field(default_factory=lambda: defaultdict(set))
    # append table -> (source, partition) -> offset ranges ran under another plan (skipped)
    skip_append: dict[str, dict[tuple[str, str], list[tuple[int, int]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    # keyed table -> why it cannot be checked
    unchecked_tables: dict[str, str] = field(default_factory=dict)


class _PlanJudge:
    """Which sinks each plan version's batches can be checked for, against the app's plan.

    A status per sink index of ``app.sinks``: ``same`` (check), ``absent`` (the sink did not
    exist: expect nothing) or ``changed`` (cannot check). Version 0 marks ranges that are no
    ledger batch (gaps, themselves violations): judged by the app's plan.
    """

    def __init__(self, app: App, versions: dict[int, tuple[plans.Plan, str | None]]) -> None:
        self.app = app
        self.plan = plans.describe(app)
        self.sids = list(plans.sink_entries(self.plan))
        self.versions = versions
        self._status: dict[int | None, list[str]] = {}
        # (table, source, partition, version) -> merged unchecked ranges
        self.ranges: dict[tuple[str, str, str, int | None], list[list[int]]] = defaultdict(list)

    def status(self, version: int | None) -> list[str]:
        """The status of every sink of the app for batches of ``version``."""
        if version not in self._status:
            if version == 0:
                found = ["same"] * len(self.sids)
            elif version is None or version not in self.versions:
                found = ["changed"] * len(self.sids)
            else:
                by_sid = plans.sink_status(self.versions[version][0], self.plan)
                found = [by_sid[sid] for sid in self.sids]
            self._status[version] = found
        return self._status[version]

    def reason(self, version: int | None, table: str) -> str:
        """Why batches of ``version`` cannot be checked for ``table``."""
        if version is None or version not in self.versions:
            return "ran before the job's plan was recorded (the plan it ran under is unknown)"
        changes = plans.diff(self.versions[version][0], self.plan)
        mine = [c.what for c in changes if c.table == table] or [c.what for c in changes]
        return f"ran under plan version {version} (changes: {'; '.join(mine)})"

    def skip(
        self, indices: list[int], version: int | None, p: _Partition, start: int, end: int,
        expected: _Expected,
    ) -> None:
        """Record that sinks ``indices`` cannot be checked over ``[start, end)``."""
        for i in indices:
            spec = self.app.sinks[i]
            if spec.kind != "append":
                expected.unchecked_tables.setdefault(
                    spec.table,
                    f"{spec.table}: {self.reason(version, spec.table)}; its rows mix results of "
                    "the old and the new plan, so verify cannot check this table",
                )
                continue
            _add_range(expected.skip_append[spec.table][(p.source, p.partition)], start, end)
            ranges = self.ranges[(spec.table, p.source, p.partition, version)]
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = end
            else:
                ranges.append([start, end])

    def notes(self, expected: _Expected) -> list[str]:
        """One line per unchecked range or table."""
        out = [
            f"{table} {source}/{partition} [{a}, {b}): {self.reason(version, table)}"
            for (table, source, partition, version), ranges in self.ranges.items()
            for a, b in ranges
        ]
        return out + sorted(expected.unchecked_tables.values())


def _add_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    """Append ``[start, end)`` to sorted, disjoint ``ranges``, merging it with the last."""
    if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], end)
    else:
        ranges.append((start, end))


def _in_ranges(ranges: list[tuple[int, int]] | None, offset: int) -> bool:
    if not ranges:
        return False
    i = bisect.bisect_right(ranges, (offset, math.inf)) - 1
    return i >= 0 and ranges[i][0] <= offset < ranges[i][1]


def _load_judge(conn: psycopg.Connection[Any], app: App) -> _PlanJudge:
    versions = {
        int(v): (plan, changes)
        for v, plan, changes in conn.execute(queries.PLAN_VERSIONS, {"job": app.name})
    }
    return _PlanJudge(app, versions)


def verify_app(app: App, dsn: str, *, chunk: int = CHUNK) -> VerifyReport:
    """Audit ``app``'s job in the database at ``dsn``.

    Returns the report (``ok`` / ``violations``); raises :class:`CannotVerify` when the audit
    cannot be carried out (schema missing, a source that no longer holds the committed range,
    a sink table that is gone, ...).
    """
    from pgstream.db.connect import connect
    from pgstream.db.migrate import ensure_migrated
    from pgstream.runtime.worker import build_sinks

    started = time.monotonic()
    report = VerifyReport(job=app.name)
    try:
        conn = connect(dsn, autocommit=False)
    except Exception as exc:
        raise CannotVerify(f"cannot connect: {str(exc).strip().splitlines()[0]}") from exc
    with conn:
        try:
            ensure_migrated(conn)
            conn.rollback()
        except Exception as exc:
            raise CannotVerify(str(exc).strip().splitlines()[0]) from exc
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        sinks = build_sinks(app)
        for sink in sinks.values():
            try:
                sink.bind(conn)
            except Exception as exc:
                raise CannotVerify(f"sink table: {str(exc).strip().splitlines()[0]}") from exc
        judge = _load_judge(conn, app)
        parts = _load_partitions(conn, app)
        report.partitions = len(parts)
        dead_rows = _load_dead_letters(conn, app.name)
        expected = _Expected()
        committed_of: dict[tuple[str, str], int | None] = {}
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
            _audit_partition(
                conn, app, dsn, source, p, sinks, stored, expected, report, chunk, judge
            )
        for spec in _unique_tables(app.sinks):
            if spec.table in expected.unchecked_tables:
                continue
            if spec.kind == "append":
                _compare_append(conn, app, spec.table, expected, committed_of, report)
            elif spec.kind == "aggregate":
                _compare_aggregate(conn, spec, expected, report)
            else:
                _compare_fold(conn, spec, expected, report)
        _compare_states(conn, app, expected, report)
        _compare_dead(dead_rows, expected, committed_of, report)
        report.unchecked.extend(judge.notes(expected))
        if app.handlers:
            report.unchecked.append(
                "@app.batch handlers write user SQL that verify cannot recompute: "
                + ", ".join(h.name for h in app.handlers)
            )
        conn.rollback()
    report.elapsed = time.monotonic() - started
    return report


def _unique_tables(specs: list[SinkSpec]) -> list[SinkSpec]:
    seen: set[str] = set()
    out = []
    for s in specs:
        if s.table not in seen:
            seen.add(s.table)
            out.append(s)
    return out


def _load_partitions(conn: psycopg.Connection[Any], app: App) -> list[_Partition]:
    rows = conn.execute(
        "SELECT source, partition, committed_offset, epoch FROM pgstream.partitions "
        "WHERE job = %s ORDER BY source, partition",
        [app.name],
    ).fetchall()
    return [_Partition(r[0], r[1], r[2], r[3]) for r in rows]


def _load_dead_letters(
    conn: psycopg.Connection[Any], job: str
) -> dict[tuple[str, str], dict[int, str]]:
    out: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for source, partition, offset, operator in conn.execute(
        'SELECT source, partition, "offset", operator FROM pgstream.dead_letters WHERE job = %s',
        [job],
    ):
        out[(source, partition)][offset] = operator or ""
    return out


Ledger = list[tuple[int, int, int, int | None]]


def _ledger(conn: psycopg.Connection[Any], job: str, p: _Partition) -> Ledger:
    rows = conn.execute(
        "SELECT start_offset, end_offset, records_in, plan_version FROM pgstream.batches "
        "WHERE job = %s AND source = %s AND partition = %s ORDER BY start_offset, end_offset",
        [job, p.source, p.partition],
    ).fetchall()
    return [(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows]


@dataclass(slots=True)
class _Segment:
    start: int
    end: int
    records_in: int | None  # None: not a ledger batch (a gap)
    version: int | None = 0  # the plan version it ran under (None: unknown; 0: no batch)


def _segments(ledger: Ledger, initial: int, p: _Partition, report: VerifyReport) -> list[_Segment]:
    """Check the ledger's tiling; return the ranges to re-evaluate (gaps included)."""
    where = {"sink": "pgstream.batches", "source": p.source, "partition": p.partition}
    committed = p.committed
    if committed is None:
        for start, _end, _n, _v in ledger:
            report.violations.append(
                Violation("ledger-overlap", offset=start, detail="a batch exists but the "
                          "partition has no committed offset", **where)
            )
        return []
    segs: list[_Segment] = []
    pos = initial
    for start, end, n, version in ledger:
        if start > pos:
            report.violations.append(
                Violation("ledger-gap", offset=_real(pos),
                          detail=f"no batch covers {_offsets(pos, start)}", **where)
            )
            segs.append(_Segment(pos, min(start, committed), None))
        elif start < pos:
            report.violations.append(
                Violation("ledger-overlap", offset=start,
                          detail=f"{_batch(start, end)} overlaps what ends at {pos}", **where)
            )
        if end > committed:
            report.violations.append(
                Violation("ledger-overlap", offset=max(start, committed),
                          detail=f"{_batch(start, end)} reaches past the committed offset "
                          f"{committed}", **where)
            )
        lo, hi = max(start, pos), min(end, committed)
        if hi > lo:
            exact = start >= pos and end <= committed
            segs.append(_Segment(lo, hi, n if exact else None, version))
        pos = max(pos, end)
    if pos < committed:
        report.violations.append(
            Violation("ledger-gap", offset=_real(pos),
                      detail=f"{_ledger_end(pos)} but the committed offset is {committed}",
                      **where)
        )
        segs.append(_Segment(pos, committed, None))
    return [s for s in segs if s.end > s.start]


def _read_range(
    source: Source, reader: PartitionReader, start: int, end: int, chunk: int
) -> Iterator[SourceRecord]:
    """Every record of ``[start, end)``, in offset order; raise if the source lacks some."""
    fetch = getattr(reader, "_fetch", None) if isinstance(reader, TableReader) else None
    if fetch is not None:
        yield from _read_table_range(source, fetch, start, end, chunk)
        return
    pos = start
    stalled_since: float | None = None
    while pos < end:
        try:
            res = reader.read(pos, chunk)
        except SourceError as exc:
            raise CannotVerify(
                f"{source.describe()} cannot be re-read over the committed range: {exc}"
            ) from exc
        if res.end <= pos:
            head = reader.head()
            if head is not None and head < end:
                raise CannotVerify(
                    f"{source.describe()} no longer holds the committed range: it ends at "
                    f"{head}, the job committed up to {end} (truncated or replaced?)"
                )
            now = time.monotonic()
            if stalled_since is None:
                stalled_since = now
            elif now - stalled_since > READ_TIMEOUT:
                raise CannotVerify(
                    f"{source.describe()} returned nothing at offset {pos} for "
                    f"{READ_TIMEOUT:.0f}s though the job committed up to {end}"
                )
            time.sleep(0.05)
            continue
        stalled_since = None
        for rec in res.records:
            if rec.offset >= end:
                return
            yield rec
        pos = min(res.end, end) if not res.records or res.records[-1].offset < end else end


def _read_table_range(
    source: Source, fetch: Any, start: int, end: int, chunk: int
) -> Iterator[SourceRecord]:
    """A table's committed range, read directly: every row below a committed offset was
    already below the reader's safe horizon when it was committed, so there is nothing to
    wait for (the horizon would only add latency under concurrent writers)."""
    pos = start
    while pos < end:
        try:
            records: list[SourceRecord] = fetch(pos, end, chunk)
        except (SourceError, psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise CannotVerify(
                f"{source.describe()} cannot be re-read over the committed range: {exc}"
            ) from exc
        yield from records
        if len(records) < chunk:
            return
        pos = records[-1].offset + 1


def _audit_partition(
    conn: psycopg.Connection[Any],
    app: App,
    dsn: str,
    source: Source,
    p: _Partition,
    sinks: dict[str, Any],
    stored_dead: dict[int, str],
    expected: _Expected,
    report: VerifyReport,
    chunk: int,
    judge: _PlanJudge,
) -> None:
    initial = source.initial_offset(p.partition)
    ledger = _ledger(conn, app.name, p)
    segs = _segments(ledger, initial, p, report)
    report.batches += len(ledger)
    if not segs:
        return
    states: dict[str, KeyedState] = {}
    for spec in app.sinks:
        if spec.kind == "fold" and spec.stream == p.source:
            states[spec.operator_id] = KeyedState(app.name, spec.operator_id, p.partition)
    runtime_dead = {off for off, op in stored_dead.items() if op in RUNTIME_DEAD_OPERATORS}
    pipelines: dict[tuple[int, ...], Pipeline] = {}

    def pipeline_for(indices: tuple[int, ...]) -> Pipeline:
        """The operators of the sinks ``indices`` only (those a segment's plan had)."""
        if indices not in pipelines:
            subset = copy.copy(app)
            subset.sinks = [app.sinks[i] for i in indices]
            pipelines[indices] = Pipeline(subset, p.source, p.partition, sinks, states)
            pipelines[indices].on_error = "dead_letter"
        return pipelines[indices]

    try:
        reader = source.open(p.partition, OpenContext(dsn))
    except SourceError as exc:
        raise CannotVerify(f"{source.describe()} cannot be opened: {exc}") from exc
    key = (p.source, p.partition)
    dead = expected.dead[key]
    try:
        stream = _read_range(source, reader, segs[0].start, segs[-1].end, chunk)
        pending: SourceRecord | None = None
        for seg in segs:
            records: list[SourceRecord] = []
            if pending is not None and seg.start <= pending.offset < seg.end:
                records.append(pending)
                pending = None
            if pending is None:
                for rec in stream:
                    if rec.offset < seg.start:
                        continue  # between segments (cannot happen: segments are contiguous)
                    if rec.offset >= seg.end:
                        pending = rec
                        break
                    records.append(rec)
            _check_count(seg, records, source, p, report)
            report.records += len(records)
            status = judge.status(seg.version)
            mine = [i for i, spec in enumerate(app.sinks) if spec.stream == p.source]
            changed = [i for i in mine if status[i] == "changed"]
            pipeline = pipeline_for(tuple(i for i in mine if status[i] == "same"))
            # A sink path that ran other code may have dead-lettered a record: every stored
            # dead letter of the range then stands for its record.
            accepted = set(stored_dead) if changed else runtime_dead
            judge.skip(changed, seg.version, p, seg.start, seg.end, expected)
            live = [r for r in records if r.offset not in accepted]
            dead.update(r.offset for r in records if r.offset in accepted)
            out = pipeline.evaluate(live)
            dead.update(d.offset for d in out.dead)
            _collect(pipeline, out, expected, app)
    finally:
        reader.close()


def _check_count(
    seg: _Segment,
    records: list[SourceRecord],
    source: Source,
    p: _Partition,
    report: VerifyReport,
) -> None:
    n = len(records)
    if seg.records_in is None or n == seg.records_in:
        return
    first = records[0].offset if records else None
    batch = _batch(seg.start, seg.end, first)
    if n < seg.records_in:
        raise CannotVerify(
            f"{source.describe()} no longer holds the committed range: {batch} of "
            f"{p.source}/{p.partition} processed {seg.records_in} records, the source now holds "
            f"{n} there (deleted or truncated?)"
        )
    report.violations.append(
        Violation(
            "lost", "pgstream.batches", p.source, p.partition, _real(seg.start, first),
            detail=f"{batch} processed {seg.records_in} records but the source holds {n} there: "
            f"{n - seg.records_in} record(s) were skipped",
        )
    )


# -- offset ranges in messages ------------------------------------------------------------------
# A table source starts at -2**63 ("before every row"): a ledger range starting there is shown
# by the offset of its first record, never as the sentinel.


def _real(offset: int, first: int | None = None) -> int | None:
    """``offset`` for a report, or the first record's offset (or None) for the sentinel."""
    return first if offset <= MIN_OFFSET else offset


def _batch(start: int, end: int, first: int | None = None) -> str:
    """``batch [start, end)``; from the sentinel, ``batch [first record, end)``."""
    if start > MIN_OFFSET:
        return f"batch [{start}, {end})"
    if first is not None:
        return f"batch [{first}, {end})"
    return f"the first batch (offsets below {end})"


def _offsets(start: int, end: int) -> str:
    """``[start, end)``, or ``the offsets below end`` from the sentinel."""
    return f"[{start}, {end})" if start > MIN_OFFSET else f"the offsets below {end}"


def _ledger_end(pos: int) -> str:
    return f"the ledger ends at {pos}" if pos > MIN_OFFSET else "the ledger has no batch"


def _collect(pipeline: Pipeline, out: Any, expected: _Expected, app: App) -> None:
    for plan in pipeline.append_plans:
        table = plan.sink.table_name
        bucket = expected.append[table]
        for cols, rows in out.append[plan.index].items():
            n = len(cols)
            for row in rows:
                bucket[(row[n], row[n + 1], row[n + 2], row[n + 3])] = (cols, row[:n])
    for agg_plan, _key in pipeline.aggregate_plans:
        accs = expected.aggregates[agg_plan.sink.table_name]
        for k, acc in out.aggregates[agg_plan.index].items():
            prev = accs.get(k)
            accs[k] = (
                list(acc)
                if prev is None
                else [_merge_acc(a, x, y) for a, x, y in zip(agg_plan.aggs, prev, acc)]
            )
    for fold_plan in pipeline.fold_plans:
        overlay = out.folds[fold_plan.index]
        fold_plan.state.merge({kj: blob for kj, (_, blob) in overlay.items()})
        table = fold_plan.sink.table_name
        width = len(fold_plan.sink.key_columns)
        for kj, (k, blob) in overlay.items():
            state = orjson.loads(blob)
            kvals = tuple(k) if width > 1 else (k,)
            expected.folds[table].setdefault(_norm_key(kvals), {})[pipeline.partition] = (
                kvals,
                state,
            )
            expected.states[(fold_plan.state.operator, pipeline.partition, kj)] = state


# -- comparisons against what is stored ---------------------------------------------------------


def _fetch(
    conn: psycopg.Connection[Any], query: sql.Composed, params: list[Any], name: str
) -> Iterator[tuple[Any, ...]]:
    """Stream a query's rows through a server-side cursor."""
    with conn.cursor(name=name) as cur:
        cur.itersize = 5000
        cur.execute(query, params)
        yield from cur


def _compare_append(
    conn: psycopg.Connection[Any],
    app: App,
    table: str,
    expected: _Expected,
    committed_of: dict[tuple[str, str], int | None],
    report: VerifyReport,
) -> None:
    exp = expected.append.get(table, {})
    sources = sorted({s.stream for s in app.sinks if s.table == table})
    cols = sorted({c for shape, _ in exp.values() for c in shape})
    from pgstream.sinks.introspect import load_table

    info = load_table(conn, table)
    missing = [c for c in cols if c not in info.columns]
    if missing:
        raise CannotVerify(f"sink table {info.label} has no column(s) {', '.join(missing)}")
    col_idx = {c: i + 4 for i, c in enumerate(cols)}
    select = sql.SQL(", ").join(
        sql.Identifier(c) for c in ("_source", "_partition", "_offset", "_seq", *cols)
    )
    query = sql.SQL("SELECT {} FROM {} WHERE _source = ANY(%s)").format(select, info.ident)
    # expected rows grouped by record, to tell a duplicate from an unexpected row
    by_record: dict[tuple[str, str, int], list[tuple[tuple[str, ...], tuple[Any, ...]]]] = (
        defaultdict(list)
    )
    for (s, p, off, _seq), shape_vals in exp.items():
        by_record[(s, p, off)].append(shape_vals)
    seen: set[AppendKey] = set()
    n_rows = 0
    skip = expected.skip_append.get(table, {})
    for row in _fetch(conn, query, [sources], "pgstream_verify_append"):
        n_rows += 1
        s, p, off, seq = row[0], row[1], int(row[2]), int(row[3])
        key: AppendKey = (s, p, off, seq)
        where = {"sink": table, "source": s, "partition": p, "offset": off}
        committed = committed_of.get((s, p))
        if committed is None or off >= committed:
            report.violations.append(
                Violation("unexpected", detail=f"_seq {seq}: a row at or above the committed "
                          f"offset ({committed})", **where)
            )
            continue
        if _in_ranges(skip.get((s, p)), off):
            n_rows -= 1  # ran under another plan: not checked (listed in the report's notes)
            continue
        if key in seen:
            report.violations.append(
                Violation("duplicated", detail=f"_seq {seq} appears twice", **where)
            )
            continue
        want = exp.get(key)
        if want is None:
            twins = [
                sv for sv in by_record.get((s, p, off), [])
                if _row_matches(sv, row, col_idx)
            ]
            kind = "duplicated" if twins else "unexpected"
            why = (
                f"_seq {seq} repeats another output of this record"
                if twins
                else f"_seq {seq}: the operators produce no such output"
            )
            report.violations.append(Violation(kind, detail=why, **where))
            continue
        seen.add(key)
        if not _row_matches(want, row, col_idx):
            shape, vals = want
            got = {c: row[col_idx[c]] for c in shape}
            report.violations.append(
                Violation("wrong-value", detail=f"_seq {seq}: expected "
                          f"{_show(dict(zip(shape, vals)))}, found {_show(got)}", **where)
            )
    report.append_rows += n_rows
    for key in exp.keys() - seen:
        s, p, off, seq = key
        report.violations.append(
            Violation("lost", table, s, p, off, detail=f"_seq {seq}: output missing from the sink")
        )


def _row_matches(
    want: tuple[tuple[str, ...], tuple[Any, ...]], row: tuple[Any, ...], col_idx: dict[str, int]
) -> bool:
    shape, vals = want
    got = tuple([row[col_idx[c]] for c in shape])
    if got == vals:  # the common case; == implies values_equal for every type involved
        return True
    return all(values_equal(v, g) for v, g in zip(vals, got))


def _keyed_rows(
    conn: psycopg.Connection[Any], table: str, key_cols: tuple[str, ...], cols: list[str]
) -> Iterator[tuple[Any, ...]]:
    from pgstream.sinks.introspect import load_table

    info = load_table(conn, table)
    missing = [c for c in cols if c not in info.columns]
    if missing:
        raise CannotVerify(f"sink table {info.label} has no column(s) {', '.join(missing)}")
    select = sql.SQL(", ").join(sql.Identifier(c) for c in (*key_cols, *cols))
    query = sql.SQL("SELECT {} FROM {}").format(select, info.ident)
    return _fetch(conn, query, [], "pgstream_verify_keyed")


def _compare_aggregate(
    conn: psycopg.Connection[Any], spec: SinkSpec, expected: _Expected, report: VerifyReport
) -> None:
    assert spec.key is not None
    key: KeySpec = spec.key
    table = spec.table
    aggs = spec.aggregates
    cols = [c for a in aggs for c in a.columns()]
    want: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Any, ...]]] = {}
    for k, acc in expected.aggregates.get(table, {}).items():
        kvals = key.values(k)
        values = tuple(v for a, x in zip(aggs, acc) for v in a.outputs(x))
        want[_norm_key(kvals)] = (kvals, values)
    width = len(key.columns)
    seen: set[tuple[Any, ...]] = set()
    for row in _keyed_rows(conn, table, key.columns, cols):
        report.keyed_rows += 1
        nk = _norm_key(row[:width])
        label = _show(row[:width] if width > 1 else row[0])
        item = want.get(nk)
        if item is None:
            report.violations.append(
                Violation("unexpected", table, spec.stream, key=label,
                          detail=f"no input has this key; row {_show(row[width:])}")
            )
            continue
        seen.add(nk)
        diffs = [
            f"{c}: expected {_show(e)}, found {_show(a)}"
            for c, e, a in zip(cols, item[1], row[width:])
            if not values_equal(e, a)
        ]
        if diffs:
            report.violations.append(
                Violation("wrong-value", table, spec.stream, key=label, detail="; ".join(diffs))
            )
    for nk in want.keys() - seen:
        kvals = want[nk][0]
        report.violations.append(
            Violation("lost", table, spec.stream, key=_show(kvals if width > 1 else kvals[0]),
                      detail="no row for this key")
        )


def _compare_fold(
    conn: psycopg.Connection[Any], spec: SinkSpec, expected: _Expected, report: VerifyReport
) -> None:
    assert spec.key is not None
    table = spec.table
    key_cols = spec.key.columns
    width = len(key_cols)
    want = expected.folds.get(table, {})
    cols: set[str] = set()
    for per_part in want.values():
        for _k, state in per_part.values():
            cols.update(state.keys() if isinstance(state, dict) else ("value",))
    ordered = sorted(cols)
    seen: set[tuple[Any, ...]] = set()
    for row in _keyed_rows(conn, table, key_cols, ordered):
        report.keyed_rows += 1
        nk = _norm_key(row[:width])
        label = _show(row[:width] if width > 1 else row[0])
        found = want.get(nk)
        if found is None:
            report.violations.append(
                Violation("unexpected", table, spec.stream, key=label,
                          detail="no input has this key")
            )
            continue
        seen.add(nk)
        stored = dict(zip(ordered, row[width:]))
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
                          detail=f"expected {_show(candidates[0])}, found {_show(got)}")
            )
    for nk in want.keys() - seen:
        report.violations.append(
            Violation("lost", table, spec.stream, key=_show(nk if width > 1 else nk[0]),
                      detail="no row for this key")
        )


def _compare_states(
    conn: psycopg.Connection[Any], app: App, expected: _Expected, report: VerifyReport
) -> None:
    operators = sorted(
        {
            s.operator_id
            for s in app.sinks
            if s.kind == "fold" and s.table not in expected.unchecked_tables
        }
    )
    if not operators:
        return
    seen: set[tuple[str, str, str]] = set()
    for op, part, key, value in conn.execute(
        "SELECT operator, partition, key, value FROM pgstream.state "
        "WHERE job = %s AND operator = ANY(%s)",
        [app.name, operators],
    ):
        k = (op, part, key)
        if k not in expected.states:
            report.violations.append(
                Violation("unexpected", "pgstream.state", "-", part, key=f"{op} {key}",
                          detail="state for a key no committed input touched")
            )
            continue
        seen.add(k)
        want = expected.states[k]
        if not values_equal(want, value):
            report.violations.append(
                Violation("wrong-value", "pgstream.state", "-", part, key=f"{op} {key}",
                          detail=f"expected {_show(want)}, found {_show(value)}")
            )
    for op, part, key in expected.states.keys() - seen:
        report.violations.append(
            Violation("lost", "pgstream.state", "-", part, key=f"{op} {key}",
                      detail="fold state missing")
        )


def _compare_dead(
    dead_rows: dict[tuple[str, str], dict[int, str]],
    expected: _Expected,
    committed_of: dict[tuple[str, str], int | None],
    report: VerifyReport,
) -> None:
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
                              detail=f"dead letter ({op}) for a record the operators accept")
                )
    for (s, p), failing in expected.dead.items():
        have = dead_rows.get((s, p), {})
        for off in sorted(failing - have.keys()):
            report.violations.append(
                Violation("lost", sink, s, p, off, detail="the record fails in the operators "
                          "but has no dead letter")
            )

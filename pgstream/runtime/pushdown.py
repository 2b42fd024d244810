"""SQL pushdown: a declarative sink path from a table runs as one ``INSERT ... SELECT``.

A sink path can be pushed down when everything between its :class:`TableSource` and its sink
is declarative: ``filter`` and ``select`` with column expressions, ``key_by`` on columns or
expressions, built-in aggregates of columns or expressions, tumbling windows on a column, and
an append or aggregate sink. :func:`analyze` says whether a path qualifies and, if not, which
step keeps it in Python (what ``pgstream explain`` prints).

A pushed-down path is a :class:`PushedPlan` wrapping the Python plan of the same path. In a
normal batch (:attr:`BatchOutput.pushed` holds its slot) it skips the records and, in step 3
of the batch transaction, after the compare-and-set, writes its sink with one statement over
the batch's offsets ``[start, end)``: append rows with their bookkeeping columns, or per-key
deltas merged ``ON CONFLICT`` exactly like the Python path's upsert. No row crosses into
Python. Everything else is the Python plan's: a batch being bisected after a sink rejection,
``pgstream verify`` (which recomputes in Python with the same compiled expressions, the
cross-check), the records the pipeline dead-letters in another plan (excluded by offset).

The first statement of a plan is planned with ``EXPLAIN`` under a savepoint: a path SQL cannot
run (a type error, a function on the wrong type) falls back to Python for good
(:class:`PushdownFallback`), with a warning naming the error.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql

from pgstream.api import App, SinkSpec
from pgstream.config import Settings
from pgstream.db.names import parse_table_name
from pgstream.expressions import Env, Expr, Select, UnknownColumn, col
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.lookup import Lookup
from pgstream.operators.steps import Filter, Map
from pgstream.runtime.output import BatchOutput
from pgstream.runtime.sinkplans import AggregatePlan, AppendPlan, Kernels, SinkPlan
from pgstream.sinks.append import META_COLUMNS, DuplicateOutputError
from pgstream.sources.base import Source
from pgstream.sources.table import TableSource

__all__ = [
    "SQL_BATCH",
    "NotPushable",
    "PathReport",
    "PushdownFallback",
    "PushedPlan",
    "Shape",
    "analyze",
    "explain_app",
    "in_sql",
    "maybe_pushed",
]

log = logging.getLogger("pgstream.pushdown")

#: rows per batch of a partition whose every path runs in SQL (unless ``batch_size`` is set):
#: such batches hold no rows in memory, and bigger statements amortise the transaction
SQL_BATCH = 500_000


class NotPushable(Exception):
    """Why a sink path stays in Python (the message names the step)."""


class PushdownFallback(Exception):
    """A pushed-down statement cannot run at all (not a bad row): the batch must be evaluated
    and written in Python, and the path stays there."""


@dataclass(frozen=True, slots=True)
class Shape:
    """A pushed-down path as SQL pieces over the source table's columns."""

    #: conditions every row must meet (the filters)
    conditions: tuple[sql.Composable, ...]
    #: sink columns written, in order (keys first for aggregates)
    columns: tuple[str, ...]
    #: the SELECT list, one per column
    values: tuple[sql.Composable, ...]
    #: how many of ``columns`` are the key (GROUP BY); 0 for an append path
    keys: int
    #: the aggregates (their merge clauses), empty for an append path
    aggregates: tuple[Aggregate, ...] = ()


def analyze(spec: SinkSpec, source: Source | None) -> Shape:
    """``spec`` as a pushed-down statement's pieces, or :class:`NotPushable` saying why not."""
    if not isinstance(source, TableSource):
        kind = "unknown" if source is None else source.describe()
        raise NotPushable(f"its source is a {kind}, not a TableSource")
    if spec.kind not in ("append", "aggregate"):
        raise NotPushable(f"a {spec.kind} keeps per-key state in Python")
    start: Env = None  # the source's columns, by name
    if source.columns is not None:
        start = {c: sql.Identifier(c) for c in source.columns}
    env, conditions = _steps(spec, start)
    if spec.kind == "append":
        return _append_shape(spec, source, env, conditions)
    return _aggregate_shape(spec, env, conditions)


def _steps(spec: SinkSpec, env: Env) -> tuple[Env, list[sql.Composable]]:
    conditions: list[sql.Composable] = []
    for i, step in enumerate(spec.steps, 1):
        kind = type(step).__name__.lower().replace("flatmap", "flat_map")
        if isinstance(step, Lookup):
            raise NotPushable(f"step {i} (lookup) reads {step.table} into each record in Python")
        if not isinstance(step, (Filter, Map)) or step.expr is None:
            raise NotPushable(f"step {i} ({kind}) is a Python function")
        try:
            if isinstance(step, Filter):
                conditions.append(step.expr.to_sql(env))
            else:
                assert isinstance(step.expr, Select)
                env = step.expr.env(env)
        except UnknownColumn as exc:
            raise NotPushable(f"step {i} ({kind}) reads {_missing(exc)}") from None
    return env, conditions


def _resolve(value: str | Expr, env: Env, what: str) -> sql.Composable:
    try:
        return (col(value) if isinstance(value, str) else value).to_sql(env)
    except UnknownColumn as exc:
        raise NotPushable(f"{what} reads {_missing(exc)}") from None


def _missing(exc: UnknownColumn) -> str:
    return (
        f"column {exc.name!r}, which its records do not have there (not produced by the select "
        "before it, or not in TableSource(columns=...))"
    )


def _append_shape(
    spec: SinkSpec, source: TableSource, env: Env, conditions: list[sql.Composable]
) -> Shape:
    if env is None:
        raise NotPushable(
            "it appends whole rows without select() (their columns are known only at run "
            "time); add select(...) or TableSource(columns=[...])"
        )
    return Shape(tuple(conditions), tuple(env), tuple(env.values()), 0)


def _aggregate_shape(spec: SinkSpec, env: Env, conditions: list[sql.Composable]) -> Shape:
    key = spec.key
    assert key is not None
    window = spec.window
    if window is not None and not (window.plain and window.clock.unit == "s"):
        raise NotPushable(
            "its window has a grace, emit='final', hopping or session windows or time_unit "
            "(watermarks, sessions, "
            "late records and final rows are kept in Python)"
        )
    values: list[sql.Composable] = []
    if key.exprs is not None:
        values += [_resolve(e, env, "key_by") for e in key.exprs]
    elif isinstance(key.by, tuple):
        values += [_resolve(c, env, "key_by") for c in key.by]
    else:
        raise NotPushable("key_by is a Python function")
    if key.window is not None:
        size, time = key.window
        if not isinstance(time, str):
            raise NotPushable("the window's time is a Python function")
        values.append(
            sql.SQL("date_bin(make_interval(secs => {}), {}, {})").format(
                sql.Literal(size),
                _resolve(time, env, "window(time=...)"),
                sql.SQL("'1970-01-01 00:00:00+00'::timestamptz"),
            )
        )
    for agg in spec.aggregates:
        values += _aggregate_sql(agg, env)
    columns = (*key.columns, *(c for a in spec.aggregates for c in a.columns()))
    return Shape(tuple(conditions), columns, tuple(values), len(key.columns), spec.aggregates)


def _aggregate_sql(agg: Aggregate, env: Env) -> list[sql.Composable]:
    if agg.field is None:
        arg: sql.Composable = sql.SQL("*")
    elif isinstance(agg.field, (str, Expr)):
        arg = _resolve(agg.field, env, f"{agg.kind}() of {agg.name}")
    else:
        raise NotPushable(f"aggregate {agg.name}={agg.kind}(fn) reads a Python function")
    if agg.kind == "avg":
        return [
            sql.SQL("sum({a})::numeric / NULLIF(count({a}), 0)").format(a=arg),
            sql.SQL("sum({})").format(arg),
            sql.SQL("count({})").format(arg),
        ]
    return [sql.SQL(agg.kind + "({})").format(arg)]


def statement(shape: Shape, source: TableSource, partition: str, sink: sql.Identifier) -> (
    sql.Composed
):
    """The pushed-down ``INSERT ... SELECT`` of one batch. Parameters: ``start``, ``end``,
    ``source``, ``partition``, ``dead`` (offsets set aside by other plans)."""
    off = sql.Identifier(source.offset_column)
    where: list[sql.Composable] = [
        sql.SQL("{off} >= %(start)s AND {off} < %(end)s").format(off=off),
        sql.SQL("NOT ({off} = ANY(%(dead)s::bigint[]))").format(off=off),
    ]
    part = source.partition_filter(partition)
    if part is not None:
        where.append(part)
    values = list(shape.values)
    columns = list(shape.columns)
    if shape.keys == 0:
        columns += META_COLUMNS
        values += [sql.SQL("%(source)s::text"), sql.SQL("%(partition)s::text"), off, sql.SQL("0")]
    select = sql.SQL("SELECT {values} FROM {rows}").format(
        values=sql.SQL(", ").join(values),
        rows=_batch_rows(source.table_ident, where, shape.conditions),
    )
    target = sql.Identifier("t")
    head = sql.SQL("INSERT INTO {sink} AS {t} ({cols}) ").format(
        sink=sink, t=target, cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    )
    if shape.keys == 0:
        return head + select
    positions = sql.SQL(", ").join(sql.Literal(i) for i in range(1, shape.keys + 1))
    keys = sql.SQL(", ").join(sql.Identifier(c) for c in shape.columns[: shape.keys])
    merge = sql.SQL(", ").join(c for a in shape.aggregates for c in a.merge_sql(target))
    return head + sql.SQL(
        "{select} GROUP BY {pos} ORDER BY {pos} ON CONFLICT ({keys}) DO UPDATE SET {merge}"
    ).format(select=select, pos=positions, keys=keys, merge=merge)


def _batch_rows(
    table: sql.Identifier, where: list[sql.Composable], conditions: Sequence[sql.Composable]
) -> sql.Composed:
    """The ``FROM`` of a pushed statement: the batch's rows of ``table`` that pass the
    path's filter ``conditions``.

    The conditions are computed as columns of a fenced subquery (``OFFSET 0``: not pulled
    up) and only then tested: a projection evaluates every column of every row, whereas a
    ``WHERE`` may test its conditions in any order and stop at the first one that fails. So
    an expression that raises (a division by zero) raises in SQL for every row where the
    Python path evaluates it, and the batch falls back to Python, where the record is a
    dead letter; a condition SQL skipped would have let the record through instead."""
    if not conditions:
        return sql.SQL("{} WHERE {}").format(table, sql.SQL(" AND ").join(where))
    names = [sql.Identifier(f"pgstream_condition_{i}") for i in range(len(conditions))]
    return sql.SQL(
        "(SELECT *, {conds} FROM {table} WHERE {where} OFFSET 0) AS pgstream_rows "
        "WHERE {tests}"
    ).format(
        conds=sql.SQL(", ").join(
            sql.SQL("({}) AS {}").format(c, n) for c, n in zip(conditions, names, strict=True)
        ),
        table=table,
        where=sql.SQL(" AND ").join(where),
        tests=sql.SQL(" AND ").join(names),
    )


def in_sql(plan: SinkPlan) -> bool:
    """Whether ``plan`` writes its batches in SQL now."""
    return isinstance(plan, PushedPlan) and plan.active


def maybe_pushed(
    plan: SinkPlan, spec: SinkSpec, source: Source | None, partition: str, settings: Settings
) -> SinkPlan:
    """``plan`` pushed down into SQL when its path allows it and ``settings`` let it."""
    if not settings.pushdown or not isinstance(plan, (AppendPlan, AggregatePlan)):
        return plan
    try:
        shape = analyze(spec, source)
    except NotPushable:
        return plan
    assert isinstance(source, TableSource)
    if isinstance(plan, AppendPlan):
        return PushedAppend(plan, shape, source, partition)
    return PushedAggregate(plan, shape, source, partition)


class PushedPlan(SinkPlan, abc.ABC):
    """A sink path written by one statement per batch; its Python plan does the rest."""

    def __init__(
        self,
        inner: AppendPlan | AggregatePlan,
        shape: Shape,
        source: TableSource,
        partition: str,
    ) -> None:
        self.inner = inner
        self.shape = shape
        self.source = source
        self.partition = partition
        self.label = inner.label
        #: False once the statement failed to plan: the path runs in Python from then on
        self.active = True
        self._planned = False
        self._statement: sql.Composed | None = None

    @property
    def slot(self) -> int:  # the Python plan's slot is this plan's
        return self.inner.slot

    @slot.setter
    def slot(self, value: int) -> None:
        self.inner.slot = value

    def new_slot(self) -> Any:
        return self.inner.new_slot()

    def stage(self, value: Any, out: BatchOutput) -> Any:
        if self.inner.slot in out.pushed:
            return None
        return self.inner.stage(value, out)

    def apply(self, staged: Any, offset: int, out: BatchOutput) -> None:
        if self.inner.slot not in out.pushed:
            self.inner.apply(staged, offset, out)

    def kernels(self, source: str, partition: str) -> Kernels | None:
        return self.inner.kernels(source, partition)

    @property
    def sink_label(self) -> str:
        return self.inner.sink_label

    def committed(self, out: BatchOutput) -> None:
        self.inner.committed(out)

    def expect(self, out: BatchOutput, partition: str, expected: Any) -> None:
        self.inner.expect(out, partition, expected)

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """The Python plan's rows, or, for a pushed batch, the statement over its offsets."""
        if self.inner.slot not in out.pushed:
            return self.inner.write_sink(cur, out, tolerate_duplicates)
        if not self.active:
            raise PushdownFallback(f"{self.label} runs in Python now")
        assert out.span is not None
        stmt = self._sql(tolerate_duplicates)
        params = {
            "start": out.span[0],
            "end": out.span[1],
            "source": out.source,
            "partition": out.partition,
            "dead": [d.offset for d in out.dead],
        }
        if not self._planned:
            self._plan(cur, stmt, params)
        try:
            cur.execute(stmt, params)
        except psycopg.errors.UniqueViolation as exc:
            if self.shape.keys == 0 and not tolerate_duplicates:  # as the Python append plan
                raise DuplicateOutputError(str(exc)) from exc
            raise
        return max(cur.rowcount, 0)

    def _sql(self, tolerate_duplicates: bool) -> sql.Composed:
        if self._statement is None:
            sink = getattr(self.inner.sink.info, "ident", None)
            assert isinstance(sink, sql.Identifier)
            if self.shape.keys == 0:
                self.inner.sink.check_columns(self.shape.columns)
            self._statement = statement(self.shape, self.source, self.partition, sink)
        if tolerate_duplicates and self.shape.keys == 0:
            return self._statement + sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in META_COLUMNS)
            )
        return self._statement

    def _plan(self, cur: psycopg.Cursor[Any], stmt: sql.Composed, params: dict[str, Any]) -> None:
        """Plan the statement once (``EXPLAIN`` under a savepoint): an error there means SQL
        cannot run this path at all, and it falls back to Python for good."""
        cur.execute("SAVEPOINT pgstream_pushdown")
        try:
            cur.execute(sql.SQL("EXPLAIN ") + stmt, params)
        # class 42 (undefined function, type mismatch, syntax, privilege...) or 22 (data)
        except (psycopg.ProgrammingError, psycopg.DataError) as exc:
            cur.execute("ROLLBACK TO SAVEPOINT pgstream_pushdown")
            self.active = False
            first = str(exc).strip().splitlines()[0]
            log.warning(
                "%s: SQL cannot run this path (%s); it runs in Python from now on", self.label,
                first,
            )
            raise PushdownFallback(f"{self.label}: {first}") from exc
        cur.execute("RELEASE SAVEPOINT pgstream_pushdown")
        self._planned = True
        log.info("%s (partition %s) runs in SQL (pushed down)", self.label, self.partition)


@dataclass(frozen=True, slots=True)
class PathReport:
    """How one sink path runs (what ``pgstream explain`` prints)."""

    stream: str
    target: str  # the sink table, or ``@app.batch <name>``
    runs: str  # "SQL" or "Python"
    why: str
    statement: str | None = None  # the pushed-down statement (partition 0), for SQL paths


def explain_app(app: App) -> list[PathReport]:
    """Per sink path of ``app``: SQL or Python, and why (which step blocks pushdown)."""
    reports = []
    for spec in app.sinks:
        source = app.sources.get(spec.stream)
        if not app.settings.pushdown:
            reports.append(PathReport(spec.stream, spec.table, "Python", "pushdown is off"))
            continue
        try:
            shape = analyze(spec, source)
        except NotPushable as exc:
            reports.append(PathReport(spec.stream, spec.table, "Python", str(exc)))
            continue
        assert isinstance(source, TableSource)
        what = "per-key deltas merged ON CONFLICT" if shape.keys else "append rows"
        schema, name = parse_table_name(spec.table)
        sink = sql.Identifier(name) if schema is None else sql.Identifier(schema, name)
        text = statement(shape, source, "0", sink).as_string(None)
        why = f"one INSERT ... SELECT per batch ({what}); no row crosses into Python"
        reports.append(PathReport(spec.stream, spec.table, "SQL", why, text))
    for h in app.handlers:
        reports.append(
            PathReport(h.stream, f"@app.batch {h.name}", "Python", "a batch handler is Python")
        )
    mixed = {r.stream for r in reports if r.runs == "Python"}
    return [
        dataclasses.replace(r, why=r.why + "; its stream's rows are still read for its Python "
                            "paths")
        if r.runs == "SQL" and r.stream in mixed
        else r
        for r in reports
    ]


class PushedAppend(PushedPlan):
    """An append path pushed down."""

    ORDER = AppendPlan.ORDER
    PER_RECORD = AppendPlan.PER_RECORD


class PushedAggregate(PushedPlan):
    """An aggregate path pushed down."""

    ORDER = AggregatePlan.ORDER
    PER_RECORD = AggregatePlan.PER_RECORD

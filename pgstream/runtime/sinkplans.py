"""Sink plans: one object per sink path that evaluates records, writes itself into the batch
transaction and says what ``pgstream verify`` should find.

A plan owns one slot of :class:`~pgstream.runtime.output.BatchOutput` (append rows grouped by
columns, aggregate deltas, fold overlays, handler records). The pipeline stages and applies
records through every plan; ``commit_batch`` asks every plan, in the pipeline's fixed order, to
write its state, then its sink rows, then run its handler; ``verify`` asks every plan what its
replayed batches must have left behind (:meth:`SinkPlan.expect`). A new kind of sink path (a
pushed-down SQL path, a final-window emitter, an outbox) is one new subclass registered in
:data:`PLAN_KINDS`.
"""

from __future__ import annotations

import abc
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import psycopg
import psycopg.errors

from pgstream.api import Batch, BatchHandlerSpec, SinkSpec
from pgstream.errors import PgStreamError
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.fold import Fold
from pgstream.operators.keys import KeySpec
from pgstream.operators.steps import compile_chain, compose
from pgstream.runtime import kernels
from pgstream.runtime.output import BatchOutput
from pgstream.sinks.append import AppendSink, DuplicateOutputError, Position, make_row, split_row
from pgstream.sinks.upsert import AggregateSink, UpsertSink
from pgstream.state.store import KeyedState
from pgstream.usercode import describe, format_traceback

if TYPE_CHECKING:
    from pgstream.runtime.checkpoint import BatchRange

log = logging.getLogger("pgstream.checkpoint")

Row = tuple[Any, ...]
Kernels = tuple[kernels.RawKernel, kernels.RecordsKernel]


class HandlerError(PgStreamError):
    """An ``@app.batch`` handler raised."""


@dataclass(slots=True)
class Expectations:
    """What the sinks must hold after the batches replayed so far (``verify``'s yardstick),
    filled by every plan's :meth:`SinkPlan.expect`."""

    #: append table -> position -> (columns, values) of the output there
    rows: dict[str, dict[Position, tuple[tuple[str, ...], Row]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    #: aggregate table -> key -> every batch's delta merged (:meth:`Aggregate.merge`)
    accumulators: dict[str, dict[Any, list[Any]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    #: fold table -> (partition, JSON key) -> (key column values, state)
    folds: dict[str, dict[tuple[str, str], tuple[Row, Any]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    #: (operator id, partition, JSON key) -> the state ``pgstream.state`` must hold
    states: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    #: window operator -> (source, partition, offset, seq, window start) -> (event time,
    #: watermark) of the records ``pgstream.late_records`` must hold
    late: dict[str, dict[tuple[str, str, int, int, float], tuple[float, float]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    #: (repartition stream, upstream stream) -> (upstream partition, offset, output number)
    #: -> (repartition partition, key JSON, payload) of the row ``pgstream.repartition`` holds
    handed_over: dict[tuple[str, str], dict[tuple[str, int, int], tuple[int, str, Any]]] = field(
        default_factory=lambda: defaultdict(dict)
    )


class SinkPlan(abc.ABC):
    """One sink path of a partition: its operators, its slot of the output, its writes."""

    #: position among the kinds: the batch transaction writes plans in this order
    ORDER: ClassVar[int]
    #: whether the output grows with the records (rows, records) rather than with the keys
    PER_RECORD: ClassVar[bool] = False
    #: whether the next batch, evaluated before this one commits, continues from its slot
    CARRIES_OVER: ClassVar[bool] = False

    label: str
    #: the index of this plan's entry in ``BatchOutput.slots``
    slot: int = 0

    @abc.abstractmethod
    def new_slot(self) -> Any:
        """An empty slot for a new batch."""

    @abc.abstractmethod
    def stage(self, value: Any, out: BatchOutput) -> Any:
        """Compute this record's contribution without changing ``out`` (may raise)."""

    @abc.abstractmethod
    def apply(self, staged: Any, offset: int, out: BatchOutput) -> None:
        """Add a staged contribution to ``out`` (never raises)."""

    def opened(self, out: BatchOutput) -> None:  # noqa: B027 - an optional step
        """A new batch output was created (``out.pending``: the previous batch's slots when
        it has not committed yet): set up this plan's slot from what came before."""

    def kernels(self, source: str, partition: str) -> Kernels | None:
        """Fused loops doing :meth:`stage` + :meth:`apply` for a whole batch into this
        plan's slot, when this plan is the partition's only one (see
        :mod:`pgstream.runtime.kernels`); ``None`` when there are none for it."""
        return None

    @property
    def sink_label(self) -> str:
        """The sink table this plan writes, for error messages (empty when none)."""
        return ""

    def fields(self) -> frozenset[str] | None:
        """The record fields this plan reads, when it can tell: no Python function sees its
        records (``None``: any field may be read)."""
        return None

    def write_state(  # noqa: B027 - an optional step
        self, cur: psycopg.Cursor[Any], out: BatchOutput
    ) -> None:
        """Step 2 of the batch transaction: this plan's operator state."""

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """Step 3: this plan's sink rows; returns how many."""
        return 0

    def run_handler(  # noqa: B027 - an optional step
        self, cur: psycopg.Cursor[Any], rng: BatchRange, out: BatchOutput
    ) -> None:
        """Step 4: this plan's ``@app.batch`` handler."""

    def committed(self, out: BatchOutput) -> None:  # noqa: B027 - an optional step
        """The batch of ``out`` committed: adopt what it changed in memory."""

    def expect(  # noqa: B027 - a plan with no sink expects nothing
        self, out: BatchOutput, partition: str, expected: Expectations
    ) -> None:
        """Add what a replayed batch of ``partition`` leaves in this plan's sink."""


class AppendPlan(SinkPlan):
    """map/filter/flat_map into an append sink: rows grouped by their column names."""

    ORDER = 0
    PER_RECORD = True

    def __init__(self, spec: SinkSpec, sink: AppendSink) -> None:
        self.label = f"to_table({spec.table})"
        self.table = spec.table
        self.sink = sink
        self.steps = spec.steps
        self.chain = compile_chain(spec.steps)

    def new_slot(self) -> dict[tuple[str, ...], list[Row]]:
        return {}

    def stage(self, value: Any, out: BatchOutput) -> list[Any]:
        outs = self.chain(value)
        for o in outs:
            if type(o) is not dict:
                raise TypeError(f"{self.label} needs dict records, got {type(o).__name__}")
        return outs

    def apply(self, staged: list[dict[str, Any]], offset: int, out: BatchOutput) -> None:
        groups = out.slots[self.slot]
        source, partition = out.source, out.partition
        for seq, o in enumerate(staged):
            cols = tuple(o)
            row = make_row(o.values(), source, partition, offset, seq)
            rows = groups.get(cols)
            if rows is None:
                groups[cols] = [row]
            else:
                rows.append(row)

    def kernels(self, source: str, partition: str) -> Kernels | None:
        fn = compose(self.steps)
        return None if fn is None else kernels.append_kernels(fn, self.label, source, partition)

    @property
    def sink_label(self) -> str:
        return self.sink.info.label

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """COPY the rows; after rewound offsets, ``INSERT ... ON CONFLICT DO NOTHING``."""
        groups: dict[tuple[str, ...], list[Row]] = out.slots[self.slot]
        if not groups:
            return 0
        if tolerate_duplicates:
            for cols, rows in groups.items():
                self.sink.insert_ignoring_duplicates(cur, cols, rows)
        else:
            try:
                self.sink.write(cur, groups)
            except psycopg.errors.UniqueViolation as exc:
                raise DuplicateOutputError(str(exc)) from exc
        return sum(len(rows) for rows in groups.values())

    def expect(self, out: BatchOutput, partition: str, expected: Expectations) -> None:
        """Every row at its position."""
        bucket = expected.rows[self.table]
        for cols, rows in out.slots[self.slot].items():
            for row in rows:
                values, position = split_row(row)
                bucket[position] = (cols, values)


def aggregate_row(key: KeySpec, aggs: tuple[Aggregate, ...], k: Any, acc: list[Any]) -> Row:
    """The sink row of one key: its key columns, then every aggregate's columns."""
    values: list[Any] = list(key.values(k))
    for a, v in zip(aggs, acc):
        values.extend(a.outputs(v))
    return tuple(values)


class AggregatePlan(SinkPlan):
    """key_by + aggregate: per-key accumulators for the batch's deltas (a window is part of
    the key)."""

    ORDER = 1

    def __init__(self, spec: SinkSpec, sink: AggregateSink) -> None:
        assert spec.key is not None
        self.label = f"aggregate->{spec.table}"
        self.table = spec.table
        self.sink = sink
        self.steps = spec.steps
        self.chain = compile_chain(spec.steps)
        self.key: KeySpec = spec.key
        self.key_fn = spec.key.fn
        self.aggs: tuple[Aggregate, ...] = spec.aggregates
        self.extract: list[Callable[[Any], Any] | None] = [a.extractor() for a in spec.aggregates]

    def new_slot(self) -> dict[Any, list[Any]]:
        return {}

    def stage(self, value: Any, out: BatchOutput) -> dict[Any, list[Any]]:
        accs = out.slots[self.slot]
        local: dict[Any, list[Any]] = {}
        for o in self.chain(value):
            key = self.key_fn(o)
            current = local.get(key)
            if current is None:
                current = accs.get(key)
            inputs = [None if ex is None else ex(o) for ex in self.extract]
            if current is None:
                local[key] = [a.start(x) for a, x in zip(self.aggs, inputs)]
            else:
                local[key] = [a.add(c, x) for a, c, x in zip(self.aggs, current, inputs)]
        return local

    def apply(self, staged: dict[Any, list[Any]], offset: int, out: BatchOutput) -> None:
        out.slots[self.slot].update(staged)

    def kernels(self, source: str, partition: str) -> Kernels | None:
        fn = compose(self.steps)
        return None if fn is None else kernels.aggregate_kernels(fn, self.key_fn, self.aggs)

    def fields(self) -> frozenset[str] | None:
        """Key, window time and aggregate inputs, when all are field names and no step
        comes before them."""
        by, window = self.key.by, self.key.window
        if self.steps or not isinstance(by, tuple):
            return None
        used = set(by)
        if window is not None:
            if not isinstance(window[1], str):
                return None
            used.add(window[1])
        for agg in self.aggs:
            if agg.field is not None and not isinstance(agg.field, str):
                return None
            if agg.field is not None:
                used.add(agg.field)
        return frozenset(used)

    @property
    def sink_label(self) -> str:
        return self.sink.info.label

    def rows(self, accs: dict[Any, list[Any]]) -> list[Row]:
        """Sink rows (key columns, then every aggregate's columns) for the batch's deltas."""
        if not any(a.kind == "avg" for a in self.aggs):  # one column per aggregate
            if len(self.key.columns) == 1:
                return [(k, *acc) for k, acc in accs.items()]
            return [(*k, *acc) for k, acc in accs.items()]
        return [aggregate_row(self.key, self.aggs, k, acc) for k, acc in accs.items()]

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """Upsert the deltas; the sink merges them in SQL."""
        rows = self.rows(out.slots[self.slot])
        self.sink.write(cur, self.sink.value_columns(), rows)
        return len(rows)

    def expect(self, out: BatchOutput, partition: str, expected: Expectations) -> None:
        """The batch's deltas merged into those of the batches before."""
        accs = expected.accumulators[self.table]
        for k, acc in out.slots[self.slot].items():
            prev = accs.get(k)
            accs[k] = (
                list(acc)
                if prev is None
                else [a.merge(x, y) for a, x, y in zip(self.aggs, prev, acc)]
            )


Overlay = dict[str, tuple[Any, bytes]]


class FoldPlan(SinkPlan):
    """key_by + fold: per-key JSON state, overlaid on the committed state."""

    ORDER = 2
    CARRIES_OVER = True

    def __init__(self, spec: SinkSpec, sink: UpsertSink, state: KeyedState) -> None:
        assert spec.key is not None and spec.fold is not None
        self.label = f"fold->{spec.table}"
        self.table = spec.table
        self.sink = sink
        self.chain = compile_chain(spec.steps)
        self.key_fn = spec.key.fn
        self.fold: Fold = spec.fold
        self.state = state

    def new_slot(self) -> Overlay:
        return {}

    def stage(self, value: Any, out: BatchOutput) -> Overlay:
        overlay = out.slots[self.slot]
        pending = out.pending[self.slot] if out.pending else {}
        committed = self.state.values
        local: Overlay = {}
        for o in self.chain(value):
            key = self.key_fn(o)
            kj = orjson.dumps(key).decode()
            hit = local.get(kj) or overlay.get(kj) or pending.get(kj)
            blob = hit[1] if hit is not None else committed.get(kj)
            local[kj] = (key, self.fold.step(blob, o, key))
        return local

    def apply(self, staged: Overlay, offset: int, out: BatchOutput) -> None:
        out.slots[self.slot].update(staged)

    @property
    def sink_label(self) -> str:
        return self.sink.info.label

    def write_state(self, cur: psycopg.Cursor[Any], out: BatchOutput) -> None:
        """Upsert the keys this batch touched into ``pgstream.state``."""
        overlay: Overlay = out.slots[self.slot]
        self.state.write(cur, {k: blob for k, (_, blob) in overlay.items()})

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """Overwrite each touched key's row with its state's columns."""
        written = 0
        for cols, rows in self._rows(out.slots[self.slot]).items():
            self.sink.write(cur, cols, rows)
            written += len(rows)
        return written

    def _rows(self, overlay: Overlay) -> dict[tuple[str, ...], list[Row]]:
        by_cols: dict[tuple[str, ...], list[Row]] = {}
        width = len(self.sink.key_columns)
        for key, blob in overlay.values():
            cols, values = self.fold.output(blob)
            key_values = key if width > 1 else (key,)
            by_cols.setdefault(cols, []).append((*key_values, *values))
        return by_cols

    def committed(self, out: BatchOutput) -> None:
        """Merge the overlay into the in-memory committed state."""
        self.state.merge({k: blob for k, (_, blob) in out.slots[self.slot].items()})

    def expect(self, out: BatchOutput, partition: str, expected: Expectations) -> None:
        """Each touched key's state, in the sink and in ``pgstream.state``."""
        folds = expected.folds[self.table]
        width = len(self.sink.key_columns)
        for kj, (k, blob) in out.slots[self.slot].items():
            state = orjson.loads(blob)
            kvals = tuple(k) if width > 1 else (k,)
            folds[(partition, kj)] = (kvals, state)
            expected.states[(self.state.operator, partition, kj)] = state


class HandlerPlan(SinkPlan):
    """Feeds an ``@app.batch`` handler the records of its stream."""

    ORDER = 3
    PER_RECORD = True

    def __init__(self, spec: BatchHandlerSpec) -> None:
        self.label = f"batch({spec.name})"
        self.spec = spec
        self.chain = compile_chain(spec.steps)

    def new_slot(self) -> list[Any]:
        return []

    def stage(self, value: Any, out: BatchOutput) -> list[Any]:
        return self.chain(value)

    def apply(self, staged: list[Any], offset: int, out: BatchOutput) -> None:
        out.slots[self.slot].extend(staged)

    def run_handler(self, cur: psycopg.Cursor[Any], rng: BatchRange, out: BatchOutput) -> None:
        """Call the handler with the batch's records and the transaction's cursor."""
        batch = Batch(
            job=rng.job,
            source=rng.source,
            partition=rng.partition,
            start_offset=rng.start,
            end_offset=rng.end,
            records=out.slots[self.slot],
            cursor=cur,
        )
        try:
            self.spec.fn(batch)
        except psycopg.OperationalError:
            raise  # transient (lost connection, serialization failure, deadlock...): retried
        except Exception as exc:
            log.info("@app.batch handler %s failed:\n%s", self.spec.name, format_traceback(exc))
            raise HandlerError(
                f"@app.batch handler {self.spec.name} failed on {rng.source}/{rng.partition} "
                f"[{rng.start}, {rng.end}): {describe(exc)}",
                hint="the batch was rolled back; fix the handler and run again",
            ) from exc


def _append(spec: SinkSpec, sink: Any, states: dict[str, KeyedState]) -> SinkPlan:
    assert isinstance(sink, AppendSink)
    return AppendPlan(spec, sink)


def _aggregate(spec: SinkSpec, sink: Any, states: dict[str, KeyedState]) -> SinkPlan:
    assert isinstance(sink, AggregateSink)
    if spec.window is not None and not spec.window.plain:
        # windows with a watermark: their own plan (which builds on this module's)
        from pgstream.operators.sessions import Session
        from pgstream.runtime.sessionplan import SessionPlan
        from pgstream.runtime.windowplan import WindowPlan
        from pgstream.state.windows import WindowState

        state = states[spec.operator_id]
        assert isinstance(state, WindowState)
        if isinstance(spec.window.kind, Session):
            return SessionPlan(spec, sink, state)
        return WindowPlan(spec, sink, state)
    return AggregatePlan(spec, sink)


def _fold(spec: SinkSpec, sink: Any, states: dict[str, KeyedState]) -> SinkPlan:
    assert isinstance(sink, UpsertSink)
    return FoldPlan(spec, sink, states[spec.operator_id])


#: how each kind of ``to_table`` sink spec becomes a plan: ``(spec, sink, fold states)``
PLAN_KINDS: dict[str, Callable[[SinkSpec, Any, dict[str, KeyedState]], SinkPlan]] = {
    "append": _append,
    "aggregate": _aggregate,
    "fold": _fold,
}


def ordered(plans: list[SinkPlan]) -> Iterator[SinkPlan]:
    """``plans`` in write order (by kind, then as declared), their slots numbered."""
    for slot, plan in enumerate(sorted(plans, key=lambda p: p.ORDER)):
        plan.slot = slot
        yield plan

"""Evaluation of one batch: records in, staged outputs and dead letters out.

Every record is evaluated against every sink plan first (``stage``, which reads but never
changes the batch's accumulated output) and only then applied (``apply``): a record whose
operator raises in any plan leaves no output anywhere and goes to the dead letters whole.

An operator's exception is described with the user's file and line (``describe``) in the dead
letter and in the ``on_error="fail"`` message; its traceback is logged at INFO (``-v``) the
first time a plan fails at a place, at DEBUG after that.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from pgstream.api import App, BatchHandlerSpec, SinkSpec
from pgstream.config import OnError
from pgstream.errors import RecordFailedError
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.fold import Fold
from pgstream.operators.keys import KeySpec
from pgstream.operators.steps import compile_chain
from pgstream.runtime import kernels
from pgstream.sinks.append import AppendSink
from pgstream.sinks.upsert import AggregateSink, UpsertSink
from pgstream.sources.base import SourceRecord
from pgstream.sources.file import JsonLines, decode_line
from pgstream.state.store import KeyedState
from pgstream.usercode import describe_at, format_traceback, user_location

log = logging.getLogger("pgstream.pipeline")


@dataclass(slots=True)
class DeadLetter:
    """A record that could not be decoded or processed."""

    offset: int
    payload: bytes | None
    error: str
    operator: str


@dataclass(slots=True)
class BatchOutput:
    """Everything one batch will write, per plan, before it is written."""

    source: str
    partition: str
    append: list[dict[tuple[str, ...], list[tuple[Any, ...]]]]
    aggregates: list[dict[Any, list[Any]]]
    folds: list[dict[str, tuple[Any, bytes]]]
    handler_records: list[list[Any]]
    dead: list[DeadLetter] = field(default_factory=list)
    records_in: int = 0
    #: fold overlays of the previous batch when it was not committed yet at evaluation time
    #: (the next batch is evaluated while the previous one commits)
    pending_folds: list[dict[str, tuple[Any, bytes]]] | None = None


class Plan(abc.ABC):
    """One sink's path through the operators."""

    label: str
    index: int

    @abc.abstractmethod
    def stage(self, value: Any, out: BatchOutput) -> Any:
        """Compute this record's contribution without changing ``out`` (may raise)."""

    @abc.abstractmethod
    def apply(self, staged: Any, offset: int, out: BatchOutput) -> None:
        """Add a staged contribution to ``out`` (never raises)."""


class AppendPlan(Plan):
    """map/filter/flat_map into an append sink: rows grouped by their column names."""

    def __init__(self, spec: SinkSpec, sink: AppendSink, index: int) -> None:
        self.label = f"to_table({spec.table})"
        self.index = index
        self.sink = sink
        self.steps = spec.steps
        self.chain = compile_chain(spec.steps)

    def stage(self, value: Any, out: BatchOutput) -> list[Any]:
        outs = self.chain(value)
        for o in outs:
            if type(o) is not dict:
                raise TypeError(f"{self.label} needs dict records, got {type(o).__name__}")
        return outs

    def apply(self, staged: list[dict[str, Any]], offset: int, out: BatchOutput) -> None:
        groups = out.append[self.index]
        source, partition = out.source, out.partition
        for seq, o in enumerate(staged):
            cols = tuple(o)
            row = (*o.values(), source, partition, offset, seq)
            rows = groups.get(cols)
            if rows is None:
                groups[cols] = [row]
            else:
                rows.append(row)


class AggregatePlan(Plan):
    """key_by + aggregate: per-key accumulators for the batch's deltas."""

    def __init__(self, spec: SinkSpec, sink: AggregateSink, index: int) -> None:
        assert spec.key is not None
        self.label = f"aggregate->{spec.table}"
        self.index = index
        self.sink = sink
        self.steps = spec.steps
        self.chain = compile_chain(spec.steps)
        self.key_fn = spec.key.fn
        self.aggs: tuple[Aggregate, ...] = spec.aggregates
        self.extract: list[Callable[[Any], Any] | None] = [a.extractor() for a in spec.aggregates]

    def stage(self, value: Any, out: BatchOutput) -> dict[Any, list[Any]]:
        accs = out.aggregates[self.index]
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
        out.aggregates[self.index].update(staged)

    def rows(self, accs: dict[Any, list[Any]], key: KeySpec) -> list[tuple[Any, ...]]:
        """Sink rows (key columns, then every aggregate's columns) for the batch's deltas."""
        if not any(a.kind == "avg" for a in self.aggs):  # one column per aggregate
            if len(key.columns) == 1:
                return [(k, *acc) for k, acc in accs.items()]
            return [(*k, *acc) for k, acc in accs.items()]
        rows = []
        for k, acc in accs.items():
            values: list[Any] = list(key.values(k))
            for a, v in zip(self.aggs, acc):
                values.extend(a.outputs(v))
            rows.append(tuple(values))
        return rows


class FoldPlan(Plan):
    """key_by + fold: per-key JSON state, overlaid on the committed state."""

    def __init__(self, spec: SinkSpec, sink: UpsertSink, index: int, state: KeyedState) -> None:
        assert spec.key is not None and spec.fold is not None
        self.label = f"fold->{spec.table}"
        self.index = index
        self.sink = sink
        self.chain = compile_chain(spec.steps)
        self.key_fn = spec.key.fn
        self.fold: Fold = spec.fold
        self.state = state

    def stage(self, value: Any, out: BatchOutput) -> dict[str, tuple[Any, bytes]]:
        overlay = out.folds[self.index]
        pending = out.pending_folds[self.index] if out.pending_folds else {}
        committed = self.state.values
        local: dict[str, tuple[Any, bytes]] = {}
        for o in self.chain(value):
            key = self.key_fn(o)
            kj = orjson.dumps(key).decode()
            hit = local.get(kj) or overlay.get(kj) or pending.get(kj)
            blob = hit[1] if hit is not None else committed.get(kj)
            local[kj] = (key, self.fold.step(blob, o, key))
        return local

    def apply(self, staged: dict[str, tuple[Any, bytes]], offset: int, out: BatchOutput) -> None:
        out.folds[self.index].update(staged)


class HandlerPlan(Plan):
    """Feeds an ``@app.batch`` handler the records of its stream."""

    def __init__(self, spec: BatchHandlerSpec, index: int) -> None:
        self.label = f"batch({spec.name})"
        self.index = index
        self.spec = spec
        self.chain = compile_chain(spec.steps)

    def stage(self, value: Any, out: BatchOutput) -> list[Any]:
        return self.chain(value)

    def apply(self, staged: list[Any], offset: int, out: BatchOutput) -> None:
        out.handler_records[self.index].extend(staged)


class Pipeline:
    """The compiled operators of one source partition: its sink plans and handlers."""

    def __init__(
        self,
        app: App,
        source: str,
        partition: str,
        sinks: dict[str, AppendSink | UpsertSink],
        states: dict[str, KeyedState],
    ) -> None:
        self.source = source
        self.partition = partition
        self.on_error: OnError = app.settings.on_error
        self.append_plans: list[AppendPlan] = []
        self.aggregate_plans: list[tuple[AggregatePlan, KeySpec]] = []
        self.fold_plans: list[FoldPlan] = []
        self.handler_plans: list[HandlerPlan] = []
        for spec in app.sinks:
            if spec.stream != source:
                continue
            sink = sinks[spec.table]
            if spec.kind == "append":
                assert isinstance(sink, AppendSink)
                self.append_plans.append(AppendPlan(spec, sink, len(self.append_plans)))
            elif spec.kind == "aggregate":
                assert isinstance(sink, AggregateSink) and spec.key is not None
                plan = AggregatePlan(spec, sink, len(self.aggregate_plans))
                self.aggregate_plans.append((plan, spec.key))
            else:
                assert isinstance(sink, UpsertSink)
                state = states[spec.operator_id]
                self.fold_plans.append(FoldPlan(spec, sink, len(self.fold_plans), state))
        for h in app.handlers:
            if h.stream == source:
                self.handler_plans.append(HandlerPlan(h, len(self.handler_plans)))
        self.plans: list[Plan] = [
            *self.append_plans,
            *(p for p, _ in self.aggregate_plans),
            *self.fold_plans,
            *self.handler_plans,
        ]
        #: (operator, exception type, user location) whose traceback was logged at INFO
        self._logged: set[tuple[str, type[BaseException], str | None]] = set()
        self._lines_kernel: kernels.LinesKernel | None = None
        self._records_kernel: kernels.RecordsKernel | None = None
        if len(self.plans) == 1:
            self._compile_kernels(self.plans[0])

    def _compile_kernels(self, plan: Plan) -> None:
        """Fused loops for a partition that feeds one append or aggregate plan through
        map/filter steps (see :mod:`pgstream.runtime.kernels`)."""
        if not isinstance(plan, (AppendPlan, AggregatePlan)):
            return
        fn = kernels.compose(plan.steps)
        if fn is None:
            return
        if isinstance(plan, AppendPlan):
            self._lines_kernel, self._records_kernel = kernels.append_kernels(
                fn, plan.label, self.source, self.partition
            )
        else:
            self._lines_kernel, self._records_kernel = kernels.aggregate_kernels(
                fn, plan.key_fn, plan.aggs
            )

    def _output(self, pending: BatchOutput | None) -> BatchOutput:
        return BatchOutput(
            source=self.source,
            partition=self.partition,
            append=[{} for _ in self.append_plans],
            aggregates=[{} for _ in self.aggregate_plans],
            folds=[{} for _ in self.fold_plans],
            handler_records=[[] for _ in self.handler_plans],
            pending_folds=pending.folds if pending is not None and self.fold_plans else None,
        )

    @property
    def per_record_output(self) -> bool:
        """Whether a batch's output grows with its records (append rows, handler records),
        rather than with the keys it touches (aggregates, folds)."""
        return bool(self.append_plans or self.handler_plans)

    def evaluate_lines(
        self,
        batch: JsonLines,
        pending: BatchOutput | None = None,
        into: BatchOutput | None = None,
    ) -> BatchOutput:
        """:meth:`evaluate` for undecoded JSON lines: decoded in the evaluation loop itself
        when a kernel applies (blank lines are no records)."""
        if self._lines_kernel is None:
            return self.evaluate(batch.records(), pending, into)
        out = self._output(pending) if into is None else into
        out.records_in += len(batch.lines)
        target, plan = self._kernel_target(out)
        lines = batch.lines
        cursor = [0, batch.start]  # the line after the last failure, and its offset

        def offset_of(line: bytes) -> int:
            # failures come in order: walk forward to this very line object
            i, offset = cursor
            while lines[i] is not line:
                offset += len(lines[i]) + 1
                i += 1
            cursor[0], cursor[1] = i + 1, offset + len(line) + 1
            return offset

        def fail(line: bytes, value: Any, exc: BaseException | None) -> None:
            offset = offset_of(line)
            if exc is not None:
                self._failed(out, SourceRecord(offset, value), exc, plan.label)
                return
            rec = decode_line(offset, line)
            if rec is None:
                out.records_in -= 1  # a blank line
            elif rec.value is None:
                self._undecodable(out, rec)
            else:  # decodable after all (a byte-order mark): the general path
                self._evaluate_one(plan, rec, out)

        with kernels.gc_paused():
            self._lines_kernel(batch, target, fail)
        return out

    def evaluate(
        self,
        records: Sequence[SourceRecord],
        pending: BatchOutput | None = None,
        into: BatchOutput | None = None,
    ) -> BatchOutput:
        """Run every record through every plan; failing records become dead letters.

        ``pending`` is the output of the previous batch when that batch has not committed
        yet: fold plans then see its state changes. ``into`` is an output to add to (a batch
        evaluated in several chunks) instead of a new one.
        """
        out = self._output(pending) if into is None else into
        out.records_in += len(records)
        if self._records_kernel is not None:
            target, plan = self._kernel_target(out)

            def fail(rec: SourceRecord, exc: BaseException | None) -> None:
                if exc is None:
                    self._undecodable(out, rec)
                else:
                    self._failed(out, rec, exc, plan.label)

            with kernels.gc_paused():
                self._records_kernel(records, target, fail)
            return out
        plans = self.plans
        single = plans[0] if len(plans) == 1 else None
        for rec in records:
            value = rec.value
            if value is None:
                self._undecodable(out, rec)
                continue
            if single is not None:
                self._evaluate_one(single, rec, out)
                continue
            label = ""
            try:
                staged_all = []
                for plan in plans:
                    label = plan.label
                    staged_all.append(plan.stage(value, out))
            except Exception as exc:
                self._failed(out, rec, exc, label)
                continue
            for plan, staged in zip(plans, staged_all):
                plan.apply(staged, rec.offset, out)
        return out

    def _kernel_target(self, out: BatchOutput) -> tuple[Any, Plan]:
        """The single plan a kernel feeds and the part of ``out`` it fills."""
        plan = self.plans[0]
        if isinstance(plan, AppendPlan):
            return out.append[plan.index], plan
        return out.aggregates[plan.index], plan

    def _evaluate_one(self, plan: Plan, rec: SourceRecord, out: BatchOutput) -> None:
        """The general path for one record of a single-plan pipeline."""
        try:
            staged = plan.stage(rec.value, out)
        except Exception as exc:
            self._failed(out, rec, exc, plan.label)
            return
        plan.apply(staged, rec.offset, out)

    def _failed(
        self, out: BatchOutput, rec: SourceRecord, exc: BaseException, operator: str
    ) -> None:
        """An operator raised on ``rec``: log its traceback, then set it aside (or stop)."""
        where = user_location(exc)
        error = describe_at(exc, where)
        place = (operator, type(exc), where)
        first = place not in self._logged
        if first:
            self._logged.add(place)
        if first or log.isEnabledFor(logging.DEBUG):
            log.log(
                logging.INFO if first else logging.DEBUG,
                "record at offset %s of %s/%s failed in %s:\n%s",
                rec.offset,
                self.source,
                self.partition,
                operator,
                format_traceback(exc),
            )
        self._dead(out, rec, error, operator)

    def _undecodable(self, out: BatchOutput, rec: SourceRecord) -> None:
        self._dead(out, rec, rec.error or "record could not be decoded", "decode")

    def _dead(self, out: BatchOutput, rec: SourceRecord, error: str, operator: str) -> None:
        if self.on_error == "fail":
            raise RecordFailedError(
                f"record at offset {rec.offset} of {self.source}/{self.partition} failed in "
                f"{operator}: {error}",
                hint='fix the input or the operator; on_error="dead_letter" would set it aside',
            )
        out.dead.append(DeadLetter(rec.offset, payload_of(rec), error, operator))


def payload_of(rec: SourceRecord) -> bytes | None:
    """The bytes to keep for a dead record: its raw input, or its value as JSON."""
    if rec.raw is not None:
        return rec.raw
    if rec.value is None:
        return None
    return orjson.dumps(rec.value, default=str)


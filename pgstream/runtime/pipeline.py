"""Evaluation of one batch: records in, staged outputs and dead letters out.

Every record is evaluated against every sink plan first (``stage``, which reads but never
changes the batch's accumulated output) and only then applied (``apply``): a record whose
operator raises in any plan leaves no output anywhere and goes to the dead letters whole.
"""

from __future__ import annotations

import abc
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
from pgstream.sinks.append import AppendSink
from pgstream.sinks.upsert import AggregateSink, UpsertSink
from pgstream.sources.base import SourceRecord
from pgstream.state.store import KeyedState


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
        committed = self.state.values
        local: dict[str, tuple[Any, bytes]] = {}
        for o in self.chain(value):
            key = self.key_fn(o)
            kj = orjson.dumps(key).decode()
            hit = local.get(kj) or overlay.get(kj)
            blob = hit[1] if hit is not None else committed.get(kj)
            local[kj] = (key, self.fold.step(blob, o))
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

    def evaluate(self, records: Sequence[SourceRecord]) -> BatchOutput:
        """Run every record through every plan; failing records become dead letters."""
        out = BatchOutput(
            source=self.source,
            partition=self.partition,
            append=[{} for _ in self.append_plans],
            aggregates=[{} for _ in self.aggregate_plans],
            folds=[{} for _ in self.fold_plans],
            handler_records=[[] for _ in self.handler_plans],
            records_in=len(records),
        )
        plans = self.plans
        single = plans[0] if len(plans) == 1 else None
        for rec in records:
            value = rec.value
            if value is None:
                self._dead(out, rec, rec.error or "record could not be decoded", "decode")
                continue
            if single is not None:
                try:
                    staged = single.stage(value, out)
                except Exception as exc:
                    self._dead(out, rec, _describe(exc), single.label)
                    continue
                single.apply(staged, rec.offset, out)
                continue
            label = ""
            try:
                staged_all = []
                for plan in plans:
                    label = plan.label
                    staged_all.append(plan.stage(value, out))
            except Exception as exc:
                self._dead(out, rec, _describe(exc), label)
                continue
            for plan, staged in zip(plans, staged_all):
                plan.apply(staged, rec.offset, out)
        return out

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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

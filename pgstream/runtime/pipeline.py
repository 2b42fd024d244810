"""Evaluation of one batch: records in, staged outputs and dead letters out.

A partition's pipeline holds its sink plans (:mod:`pgstream.runtime.sinkplans`) in write
order. Every record is evaluated against every plan first (``stage``, which reads but never
changes the batch's accumulated output) and only then applied (``apply``): a record whose
operator raises in any plan leaves no output anywhere and goes to the dead letters whole.
A partition with a single append or aggregate plan runs that plan's fused kernels instead
(:mod:`pgstream.runtime.kernels`), on decoded records or on undecoded payloads
(:class:`~pgstream.sources.raw.RawBatch`) from any source.

An operator's exception is described with the user's file and line (``describe``) in the dead
letter and in the ``on_error="fail"`` message; its traceback is logged at INFO (``-v``) the
first time a plan fails at a place, at DEBUG after that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
import psycopg

from pgstream.api import App
from pgstream.config import OnError
from pgstream.errors import RecordFailedError
from pgstream.gcpause import gc_paused
from pgstream.operators.lookup import Lookups
from pgstream.runtime import kernels, pushdown, repartition
from pgstream.runtime.output import BatchOutput, DeadLetter
from pgstream.runtime.sinkplans import PLAN_KINDS, HandlerPlan, SinkPlan, ordered
from pgstream.sinks.append import AppendSink
from pgstream.sinks.upsert import UpsertSink
from pgstream.sources.base import SourceRecord
from pgstream.sources.raw import RawBatch
from pgstream.state.store import KeyedState
from pgstream.state.windows import WindowState
from pgstream.usercode import describe_at, format_traceback, user_location

__all__ = ["BatchOutput", "DeadLetter", "Pipeline", "new_states", "payload_of"]

log = logging.getLogger("pgstream.pipeline")


def new_states(app: App, source: str, partition: str) -> dict[str, KeyedState]:
    """Empty operator states of ``source``'s ``partition``, by operator id: each fold's, and
    each window's with a watermark (load them on takeover; verify replays from empty)."""
    states: dict[str, KeyedState] = {}
    for spec in app.sinks:
        if spec.stream != source:
            continue
        if spec.kind == "fold":
            states[spec.operator_id] = KeyedState(app.name, spec.operator_id, partition)
        elif spec.window is not None and not spec.window.plain:
            states[spec.operator_id] = WindowState(app.name, spec.operator_id, partition, source)
    return states


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
        stream_source = app.sources.get(source)
        #: the stream's table lookups, bound into the plans' steps (see :meth:`resolve`)
        self.lookups = Lookups()
        lk = self.lookups
        found: list[SinkPlan] = [
            pushdown.maybe_pushed(
                PLAN_KINDS[spec.kind](
                    replace(spec, steps=lk.bind(spec.steps)), sinks[spec.table], states
                ),
                spec,
                stream_source,
                partition,
                app.settings,
            )
            for spec in app.sinks
            if spec.stream == source and spec.repartition is None
        ]
        found += repartition.plans_for(app, source, sinks, states)
        found += [
            HandlerPlan(replace(h, steps=lk.bind(h.steps)))
            for h in app.handlers
            if h.stream == source
        ]
        #: the sink plans in write order; plan ``i`` owns ``BatchOutput.slots[i]``
        self.plans: list[SinkPlan] = list(ordered(found))
        #: (operator, exception type, user location) whose traceback was logged at INFO
        self._logged: set[tuple[str, type[BaseException], str | None]] = set()
        self._raw_kernel: kernels.RawKernel | None = None
        self._records_kernel: kernels.RecordsKernel | None = None
        if len(self.plans) == 1 and not self.lookups:
            fused = self.plans[0].kernels(source, partition)
            if fused is not None:
                self._raw_kernel, self._records_kernel = fused

    def committed(self, out: BatchOutput) -> None:
        """``out``'s batch committed: every plan adopts what it changed in memory."""
        for plan in self.plans:
            plan.committed(out)

    @property
    def sql_only(self) -> bool:
        """Whether every plan writes in SQL now: a batch needs no records read."""
        return all(pushdown.in_sql(p) for p in self.plans)

    def _output(self, pending: BatchOutput | None, in_sql: bool = False) -> BatchOutput:
        carried = None
        if pending is not None:
            carried = {p.slot: pending.slots[p.slot] for p in self.plans if p.CARRIES_OVER}
        out = BatchOutput(
            source=self.source,
            partition=self.partition,
            slots=[p.new_slot() for p in self.plans],
            pending=carried or None,
            pushed=frozenset(p.slot for p in self.plans if in_sql and pushdown.in_sql(p)),
        )
        for plan in self.plans:
            plan.opened(out)
        return out

    @property
    def per_record_output(self) -> bool:
        """Whether a batch's output grows with its records (append rows, handler records),
        rather than with the keys it touches (aggregates, folds). A pipeline with lookups
        holds its batch's records until the batch transaction evaluates them."""
        return bool(self.lookups) or any(p.PER_RECORD for p in self.plans)

    @property
    def fields(self) -> frozenset[str] | None:
        """The record fields the plans read, when every plan can tell (``None``: any field
        may be read); a table source then reads only those columns."""
        used: set[str] = set()
        for plan in self.plans:
            got = plan.fields()
            if got is None:
                return None
            used |= got
        return frozenset(used) if self.plans else None

    def evaluate_raw(
        self,
        batch: RawBatch,
        pending: BatchOutput | None = None,
        into: BatchOutput | None = None,
    ) -> BatchOutput:
        """:meth:`evaluate` for undecoded payloads: decoded in the evaluation loop itself when
        a kernel applies. Offsets are looked up only for the payloads that fail."""
        if self._raw_kernel is None or self.lookups:
            return self.evaluate(batch.records(), pending, into)
        out = self._output(pending) if into is None else into
        out.records_in += len(batch)
        plan = self.plans[0]
        payloads = batch.payloads
        cursor = [0]  # the payload after the last failure

        def index_of(payload: Any) -> int:
            # failures come in order: walk forward to this very payload object
            i = cursor[0]
            while payloads[i] is not payload:
                i += 1
            cursor[0] = i + 1
            return i

        def fail(payload: Any, value: Any, exc: BaseException | None) -> None:
            i = index_of(payload)
            if exc is not None:
                self._failed(out, SourceRecord(batch.offset(i), value), exc, plan.label)
                return
            rec = batch.decode(i)
            if rec is None:
                out.records_in -= 1  # no record (a file's blank line)
            elif rec.value is None:
                self._undecodable(out, rec)
            else:  # decodable after all (a byte-order mark): the general path
                self._evaluate_one(plan, rec, out)

        with gc_paused():
            self._raw_kernel(batch, out.slots[plan.slot], fail)
        return out

    def evaluate(
        self,
        records: Sequence[SourceRecord],
        pending: BatchOutput | None = None,
        into: BatchOutput | None = None,
        in_sql: bool = False,
    ) -> BatchOutput:
        """Run every record through every plan; failing records become dead letters.

        ``pending`` is the output of the previous batch when that batch has not committed
        yet: fold plans then see its state changes. ``into`` is an output to add to (a batch
        evaluated in several chunks) instead of a new one. ``in_sql``: plans pushed down into
        SQL (:mod:`pgstream.runtime.pushdown`) write this batch with a statement and skip its
        records; otherwise (a batch being bisected, ``verify``) every plan runs in Python.
        """
        out = self._output(pending, in_sql) if into is None else into
        out.records_in += len(records)
        if self.lookups:
            if out.deferred is None:
                out.deferred = []
            out.deferred.extend(records)
            return out
        self._evaluate(records, out)
        return out

    def resolve(self, cur: psycopg.Cursor[Any], out: BatchOutput) -> None:
        """Inside the batch transaction: read the lookups' rows (one query each), then
        evaluate the batch's deferred records into ``out``. Runs again, from scratch, when
        the transaction is retried; nothing to do for a pipeline without lookups."""
        records = out.deferred
        if records is None:
            return
        if out.kept_dead is None:
            out.kept_dead = len(out.dead)
        del out.dead[out.kept_dead :]
        out.slots = [p.new_slot() for p in self.plans]
        out.pending = None  # the previous batch has committed: its state is adopted
        self.lookups.fetch(cur, [r.value for r in records if r.value is not None])
        self._evaluate(records, out)

    def _evaluate(self, records: Sequence[SourceRecord], out: BatchOutput) -> None:
        """Every record through every plan, into ``out`` (``records_in`` already counted)."""
        if self._records_kernel is not None and not out.pushed:
            plan = self.plans[0]

            def fail(rec: SourceRecord, exc: BaseException | None) -> None:
                if exc is None:
                    self._undecodable(out, rec)
                else:
                    self._failed(out, rec, exc, plan.label)

            with gc_paused():
                self._records_kernel(records, out.slots[plan.slot], fail)
            return
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

    def _evaluate_one(self, plan: SinkPlan, rec: SourceRecord, out: BatchOutput) -> None:
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


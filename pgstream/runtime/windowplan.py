"""The window sink plan: watermarks, late records and final rows for ``window(...)`` aggregates.

A :class:`WindowPlan` evaluates a windowed aggregate record by record in offset order: it reads
the record's event time, places it in its window(s), and compares each window with the
partition's watermark *before* the record (the rules are
:mod:`pgstream.operators.windows`'s): a window already closed gets a late record instead of
the record's contribution; then the record advances the watermark. Since the watermark comes
from the partition's committed one and the records before it in the partition, a replay
classifies every record as the first run did, whatever the batch boundaries.

In the batch transaction the plan writes the new watermark into the partition row (step 2,
after the fence), its late records into ``pgstream.late_records`` and, in update mode, the
batch's per-window deltas (merged in SQL, like any aggregate); in final mode, the accumulators
of the windows still open into ``pgstream.state`` and one row for each window the batch's
watermark closed (:class:`~pgstream.state.windows.WindowState`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
import psycopg

from pgstream.api import SinkSpec
from pgstream.db import queries
from pgstream.operators.windows import WindowSpec
from pgstream.runtime.output import BatchOutput
from pgstream.runtime.sinkplans import AggregatePlan, Expectations, Kernels, SinkPlan
from pgstream.sinks.upsert import AggregateSink
from pgstream.state.windows import WindowState

#: a late record: (offset, seq, window start, window end, event time, watermark, value)
LateRow = tuple[int, int, float, float, float, float, Any]
#: what ``pgstream verify`` expects in ``pgstream.late_records``, per operator:
#: (source, partition, offset, seq, window start) -> (event time, watermark)
LateKey = tuple[str, str, int, int, float]


@dataclass(slots=True)
class WindowSlot:
    """A batch's output of one window plan."""

    #: update: sink key -> the batch's delta; final: state key -> (sink key, accumulator)
    accs: dict[Any, Any] = field(default_factory=dict)
    #: the watermark after the records evaluated so far (None: not moved by this batch)
    watermark: float | None = None
    late: list[LateRow] = field(default_factory=list)
    #: final mode: the windows this batch closes (state key -> (sink key, accumulator)),
    #: computed once from the committed state when the batch is written
    emitted: dict[str, tuple[Any, Any]] | None = None


def _epoch_dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


class WindowPlan(SinkPlan):
    """key_by + window + aggregate, with watermark, grace and emit mode (its rows and deltas
    are an :class:`AggregatePlan`'s)."""

    ORDER = AggregatePlan.ORDER
    CARRIES_OVER = True

    def __init__(self, spec: SinkSpec, sink: AggregateSink, state: WindowState) -> None:
        assert spec.window is not None and spec.key is not None
        #: the aggregate plan of the same spec: sink rows and expected deltas
        self.rows_of = AggregatePlan(spec, sink)
        self.table = spec.table
        self.sink = sink
        self.chain = self.rows_of.chain
        self.aggs = self.rows_of.aggs
        self.extract = self.rows_of.extract
        self.label = f"window->{spec.table}"
        self.window: WindowSpec = spec.window
        self.state = state
        self.operator = spec.operator_id
        self.final = spec.window.emit == "final"
        self.assigner = spec.window.kind.assigner()
        self.size = self.assigner.size
        self.as_datetime = self.assigner.as_datetime
        self.epoch_of = spec.window.clock.epoch_of
        # the key without its window: KeySpec.build's function of the fields key_by named
        assert spec.window.key is not None
        self.base_fn: Callable[[Any], Any] = spec.window.key.fn
        self.width = len(spec.key.columns) - 1
        #: state key -> window end, for the committed open windows (final mode)
        self._ends: dict[str, float] = {}

    def new_slot(self) -> WindowSlot:
        return WindowSlot()

    def kernels(self, source: str, partition: str) -> Kernels | None:
        return None

    @property
    def sink_label(self) -> str:
        return self.sink.info.label

    # -- evaluation ---------------------------------------------------------------------------

    def _watermark(self, out: BatchOutput) -> float | None:
        slot: WindowSlot = out.slots[self.slot]
        if slot.watermark is not None:
            return slot.watermark
        if out.pending:
            before: WindowSlot | None = out.pending.get(self.slot)
            if before is not None and before.watermark is not None:
                return before.watermark
        return self.state.watermark

    def _sink_key(self, k: Any, start: float) -> Any:
        ws = self.as_datetime(start)
        return (k, ws) if self.width == 1 else (*k, ws)

    def stage(self, value: Any, out: BatchOutput) -> tuple[dict[Any, Any], list[Any], Any]:
        """Per output record, in order: its windows' new accumulators or late rows, then the
        watermark it leaves."""
        slot: WindowSlot = out.slots[self.slot]
        wm = self._watermark(out)
        local: dict[Any, Any] = {}
        late: list[Any] = []
        closed = self.window.closed
        size = self.size
        for seq, o in enumerate(self.chain(value)):
            t = self.epoch_of(o)
            k = self.base_fn(o)
            inputs = [None if ex is None else ex(o) for ex in self.extract]
            for start in self.assigner.epochs(t):
                if closed(start + size, wm):
                    assert wm is not None
                    late.append((seq, start, start + size, t, wm, o))
                    continue
                self._add(local, slot, out, k, start, inputs)
            if wm is None or t > wm:
                wm = t
        return local, late, wm

    def _add(
        self,
        local: dict[Any, Any],
        slot: WindowSlot,
        out: BatchOutput,
        k: Any,
        start: float,
        inputs: list[Any],
    ) -> None:
        aggs = self.aggs
        if not self.final:
            sk = self._sink_key(k, start)
            current = local.get(sk)
            if current is None:
                current = slot.accs.get(sk)
            local[sk] = (
                [a.start(x) for a, x in zip(aggs, inputs)]
                if current is None
                else [a.add(c, x) for a, c, x in zip(aggs, current, inputs)]
            )
            return
        kj = orjson.dumps([k, start]).decode()
        hit = local.get(kj) or slot.accs.get(kj)
        if hit is None and out.pending:
            before: WindowSlot | None = out.pending.get(self.slot)
            hit = before.accs.get(kj) if before is not None else None
        if hit is not None:
            sk, acc = hit
        else:
            sk = self._sink_key(k, start)
            blob = self.state.values.get(kj)
            acc = None if blob is None else orjson.loads(blob)
        local[kj] = (
            sk,
            [a.start(x) for a, x in zip(aggs, inputs)]
            if acc is None
            else [a.add(c, x) for a, c, x in zip(aggs, acc, inputs)],
        )

    def apply(
        self, staged: tuple[dict[Any, Any], list[Any], Any], offset: int, out: BatchOutput
    ) -> None:
        local, late, wm = staged
        slot: WindowSlot = out.slots[self.slot]
        slot.accs.update(local)
        for seq, start, end, t, mark, o in late:
            slot.late.append((offset, seq, start, end, t, mark, o))
        if wm is not None:
            slot.watermark = wm

    # -- final emission -----------------------------------------------------------------------

    def _end_of(self, kj: str) -> float:
        end = self._ends.get(kj)
        if end is None:
            end = self._ends[kj] = float(orjson.loads(kj)[1]) + self.size
        return end

    def emitted(self, out: BatchOutput) -> dict[str, tuple[Any, Any]]:
        """The windows this batch closes (final mode): every open window, committed or
        touched by the batch, whose end + grace is before the batch's watermark."""
        slot: WindowSlot = out.slots[self.slot]
        if slot.emitted is not None:
            return slot.emitted
        found: dict[str, tuple[Any, Any]] = {}
        wm = slot.watermark
        if self.final and wm is not None:
            closed = self.window.closed
            for kj, (sk, acc) in slot.accs.items():
                if closed(self._end_of(kj), wm):
                    found[kj] = (sk, acc)
            for kj, blob in self.state.values.items():
                if kj not in slot.accs and closed(self._end_of(kj), wm):
                    k, start = orjson.loads(kj)
                    key = tuple(k) if isinstance(k, list) else k
                    found[kj] = (self._sink_key(key, start), orjson.loads(blob))
        slot.emitted = found
        return found

    # -- the batch transaction ----------------------------------------------------------------

    def write_state(self, cur: psycopg.Cursor[Any], out: BatchOutput) -> None:
        """The watermark into the partition row; final mode: open windows into the state,
        closed ones out of it."""
        slot: WindowSlot = out.slots[self.slot]
        self.state.write_watermark(cur, slot.watermark)
        if not self.final:
            return
        gone = self.emitted(out)
        self.state.write(
            cur,
            {kj: orjson.dumps(acc) for kj, (_, acc) in slot.accs.items() if kj not in gone},
        )
        self.state.delete(cur, [kj for kj in gone if kj in self.state.values])

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """Late records; then update mode: the batch's deltas; final: the closed windows."""
        slot: WindowSlot = out.slots[self.slot]
        self._write_late(cur, out, slot)
        accs = dict(self.emitted(out).values()) if self.final else slot.accs
        rows = self.rows_of.rows(accs)
        self.sink.write(cur, self.sink.value_columns(), rows)
        return len(rows)

    def _write_late(self, cur: psycopg.Cursor[Any], out: BatchOutput, slot: WindowSlot) -> None:
        if not slot.late:
            return
        job = self.state.job
        with cur.copy(queries.COPY_LATE_RECORDS) as copy:
            for offset, seq, start, end, t, mark, o in slot.late:
                copy.write_row(
                    (
                        job,
                        self.operator,
                        out.source,
                        out.partition,
                        offset,
                        seq,
                        _epoch_dt(start),
                        _epoch_dt(end),
                        _epoch_dt(t),
                        _epoch_dt(mark),
                        orjson.dumps(o, default=str).decode(),
                    )
                )

    def committed(self, out: BatchOutput) -> None:
        """Adopt the batch's watermark and (final mode) its open and closed windows."""
        slot: WindowSlot = out.slots[self.slot]
        if self.final:
            gone = self.emitted(out)
            self.state.merge(
                {kj: orjson.dumps(acc) for kj, (_, acc) in slot.accs.items() if kj not in gone}
            )
            self.state.forget(list(gone))
            for kj in gone:
                self._ends.pop(kj, None)
        if slot.watermark is not None:
            self.state.watermark = slot.watermark

    def expect(self, out: BatchOutput, partition: str, expected: Expectations) -> None:
        """Update: the deltas merged; final: the closed windows' rows and the open windows'
        state; both: the late records."""
        slot: WindowSlot = out.slots[self.slot]
        late = expected.late[self.operator]
        for offset, seq, start, _end, t, mark, _o in slot.late:
            late[(out.source, partition, offset, seq, start)] = (t, mark)
        if not self.final:
            self.rows_of.expect(_with_accs(out, self.slot, slot.accs), partition, expected)
            return
        gone = self.emitted(out)
        accs = expected.accumulators[self.table]
        for sk, acc in gone.values():
            accs[sk] = list(acc)
        states = expected.states
        for kj, (_, acc) in slot.accs.items():
            if kj not in gone:
                states[(self.operator, partition, kj)] = acc
        for kj in gone:
            states.pop((self.operator, partition, kj), None)


def _with_accs(out: BatchOutput, slot: int, accs: dict[Any, Any]) -> BatchOutput:
    """``out`` with its window slot replaced by the plain accumulators (AggregatePlan's)."""
    slots = list(out.slots)
    slots[slot] = accs
    return BatchOutput(out.source, out.partition, slots, out.dead, out.records_in)

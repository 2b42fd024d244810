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
from pgstream.operators.sessions import Session
from pgstream.operators.steps import compose
from pgstream.operators.windows import TumblingAssigner, WindowSpec
from pgstream.runtime import kernels
from pgstream.runtime.output import BatchOutput
from pgstream.runtime.sinkplans import AggregatePlan, Expectations, Kernels, SinkPlan
from pgstream.sinks.upsert import AggregateSink
from pgstream.state.windows import WindowState

#: a late record: (offset, seq, window start, window end, event time, watermark, value)
LateRow = tuple[int, int, float, float, float, float, Any]


@dataclass(slots=True)
class WatermarkSlot:
    """What a window or session plan's slot holds for every batch: the watermark and the
    late records (:func:`continue_watermark` starts it, :meth:`take` advances it)."""

    #: the watermark after the records evaluated so far (None: none yet), set at the start
    #: from the previous batch's (uncommitted) or the committed one
    watermark: float | None = None
    late: list[LateRow] = field(default_factory=list)

    def take(self, late: list[Any], offset: int, watermark: float | None) -> None:
        """A staged record's late rows ``(seq, start, end, t, watermark, value)`` at
        ``offset``, then the watermark it leaves (None: unchanged)."""
        for seq, start, end, t, mark, o in late:
            self.late.append((offset, seq, start, end, t, mark, o))
        if watermark is not None:
            self.watermark = watermark


@dataclass(slots=True)
class WindowSlot(WatermarkSlot):
    """A batch's output of one window plan."""

    #: sink key -> update mode: the batch's delta; final mode: the window's accumulators
    accs: dict[Any, Any] = field(default_factory=dict)
    #: the previous batch's slot while it has not committed (final mode looks there first)
    before: WindowSlot | None = None
    #: final mode: the windows this batch closes (sink key -> accumulators), computed once
    #: from the committed open windows when the batch is written
    emitted: dict[Any, list[Any]] | None = None


def epoch_dt(epoch: float) -> datetime:
    """Epoch seconds as a UTC datetime (a window bound or event time as stored)."""
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
        self.steps = spec.steps
        self.aggs = self.rows_of.aggs
        self.extract = self.rows_of.extract
        self.label = f"window->{spec.table}"
        self.window: WindowSpec = spec.window
        self.state = state
        self.operator = spec.operator_id
        self.final = spec.window.emit == "final"
        kind = spec.window.kind
        assert not isinstance(kind, Session)  # sessions have their own plan
        self.assigner = kind.assigner()
        self.size = self.assigner.size
        self.as_datetime = self.assigner.as_datetime
        self.epoch_of = spec.window.clock.epoch_of
        # the key without its window: KeySpec.build's function of the fields key_by named
        assert spec.window.key is not None
        self.base_fn: Callable[[Any], Any] = spec.window.key.fn
        self.width = len(spec.key.columns) - 1
        #: final mode: the committed open windows' accumulators by sink key, parsed from the
        #: state loaded on takeover (then kept here, not in the state's JSON map)
        self._open_windows: dict[Any, list[Any]] = {}
        #: the same windows grouped by start (epoch seconds): emission visits closed starts only
        self._by_start: dict[float, set[Any]] = {}
        self._parse_open()

    def new_slot(self) -> WindowSlot:
        return WindowSlot()

    def kernels(self, source: str, partition: str) -> Kernels | None:
        """Tumbling windows in update mode after map/filter steps only: the aggregate kernels
        (:func:`tumbling_update_kernels`)."""
        fn = compose(self.steps)
        if fn is None or self.final or not isinstance(self.assigner, TumblingAssigner):
            return None  # the general path (stage + apply)
        return tumbling_update_kernels(self, fn)

    @property
    def sink_label(self) -> str:
        return self.sink.info.label

    # -- evaluation ---------------------------------------------------------------------------

    def opened(self, out: BatchOutput) -> None:
        """Start from the previous batch's watermark (uncommitted) or the committed one."""
        continue_watermark(out, self.slot, self.state.watermark)

    def _sink_key(self, k: Any, start: float) -> Any:
        ws = self.as_datetime(start)
        return (k, ws) if self.width == 1 else (*k, ws)

    def stage(self, value: Any, out: BatchOutput) -> tuple[dict[Any, Any], list[Any], Any]:
        """Per output record, in order: its event time, its closed windows' late rows; when it
        has an open window, its key and aggregate inputs (which may raise: a dead letter) and
        its open windows' new accumulators; then the watermark it leaves."""
        slot: WindowSlot = out.slots[self.slot]
        wm = slot.watermark
        local: dict[Any, Any] = {}
        late: list[Any] = []
        closed = self.window.closed
        size, aggs, single = self.size, self.aggs, self.width == 1
        for seq, o in enumerate(self.chain(value)):
            t = self.epoch_of(o)
            open_ = []
            for start in self.assigner.epochs(t):
                if closed(start + size, wm):
                    assert wm is not None
                    late.append((seq, start, start + size, t, wm, o))
                else:
                    open_.append(start)
            if not open_:
                continue  # late for all its windows: its key and inputs are not read
            k = self.base_fn(o)
            xs = [None if ex is None else ex(o) for ex in self.extract]
            for start in open_:
                ws = self.as_datetime(start)
                sk = (k, ws) if single else (*k, ws)
                acc = local.get(sk)
                if acc is None:
                    acc = self._current(slot, sk)
                local[sk] = (
                    [a.start(x) for a, x in zip(aggs, xs)]
                    if acc is None
                    else [a.add(c, x) for a, c, x in zip(aggs, acc, xs)]
                )
            if wm is None or t > wm:
                wm = t
        return local, late, wm

    def _current(self, slot: WindowSlot, sk: Any) -> list[Any] | None:
        """A window's accumulators so far: the batch's (update mode: its delta); final mode:
        else the previous uncommitted batch's, else the committed open window's."""
        acc: list[Any] | None = slot.accs.get(sk)
        if acc is None and self.final:
            if slot.before is not None:
                acc = slot.before.accs.get(sk)
            if acc is None:
                acc = self._open().get(sk)
        return acc

    def apply(
        self, staged: tuple[dict[Any, Any], list[Any], Any], offset: int, out: BatchOutput
    ) -> None:
        local, late, wm = staged
        slot: WindowSlot = out.slots[self.slot]
        slot.accs.update(local)
        slot.take(late, offset, wm)

    # -- final emission -----------------------------------------------------------------------

    def _parse_open(self) -> None:
        for kj, blob in self.state.values.items():
            k, start = orjson.loads(kj)
            key = tuple(k) if isinstance(k, list) else k
            self._remember(self._sink_key(key, start), orjson.loads(blob))
        self.state.values = {}

    def _remember(self, sk: Any, acc: list[Any]) -> None:
        """A committed open window's accumulators (final mode)."""
        if sk not in self._open_windows:
            self._by_start.setdefault(sk[-1].timestamp(), set()).add(sk)
        self._open_windows[sk] = acc

    def _forget(self, sk: Any) -> None:
        """A committed window was emitted."""
        if self._open_windows.pop(sk, None) is not None:
            start = sk[-1].timestamp()
            group = self._by_start.get(start)
            if group is not None:
                group.discard(sk)
                if not group:
                    del self._by_start[start]

    def _open(self) -> dict[Any, list[Any]]:
        """The committed open windows (final mode) by sink key."""
        return self._open_windows

    def _state_key(self, sk: Any) -> str:
        """A window's key in ``pgstream.state``: the JSON of ``[key, window start epoch]``."""
        k = sk[0] if self.width == 1 else list(sk[:-1])
        return orjson.dumps([k, sk[-1].timestamp()]).decode()

    def emitted(self, out: BatchOutput) -> dict[Any, list[Any]]:
        """The windows this batch closes (final mode): every open window, committed or
        touched by the batch, that is closed at the batch's watermark."""
        slot: WindowSlot = out.slots[self.slot]
        if slot.emitted is not None:
            return slot.emitted
        found: dict[Any, list[Any]] = {}
        wm = slot.watermark
        if self.final and wm is not None:
            closed, size = self.window.closed, self.size
            for sk, acc in slot.accs.items():
                if closed(sk[-1].timestamp() + size, wm):
                    found[sk] = acc
            committed = self._open_windows
            for start, group in self._by_start.items():
                if closed(start + size, wm):
                    for sk in group:
                        if sk not in slot.accs:
                            found[sk] = committed[sk]
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
        key = self._state_key
        self.state.write(
            cur, {key(sk): orjson.dumps(acc) for sk, acc in slot.accs.items() if sk not in gone}
        )
        committed = self._open()
        self.state.delete(cur, [key(sk) for sk in gone if sk in committed])

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """Late records; then update mode: the batch's deltas; final: the closed windows."""
        slot: WindowSlot = out.slots[self.slot]
        write_late(cur, self.state.job, self.operator, out, slot.late)
        accs = self.emitted(out) if self.final else slot.accs
        rows = self.rows_of.rows(accs)
        self.sink.write(cur, self.sink.value_columns(), rows)
        return len(rows)

    def committed(self, out: BatchOutput) -> None:
        """Adopt the batch's watermark and (final mode) its open and closed windows."""
        slot: WindowSlot = out.slots[self.slot]
        slot.before = None  # committed before this one: no chain of old batches kept alive
        if self.final:
            gone = self.emitted(out)
            for sk, acc in slot.accs.items():
                if sk not in gone:
                    self._remember(sk, acc)
            for sk in gone:
                self._forget(sk)
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
            self.rows_of.expect(_with_accs(out, slot.accs), partition, expected)
            return
        gone = self.emitted(out)
        accs = expected.accumulators[self.table]
        for sk, acc in gone.items():
            accs[sk] = list(acc)
        states = expected.states
        for sk, acc in slot.accs.items():
            if sk not in gone:
                states[(self.operator, partition, self._state_key(sk))] = acc
        for sk in gone:
            states.pop((self.operator, partition, self._state_key(sk)), None)


def write_late(
    cur: psycopg.Cursor[Any], job: str, operator: str, out: BatchOutput, late: list[LateRow]
) -> None:
    """A window operator's late records of a batch into ``pgstream.late_records``."""
    if not late:
        return
    with cur.copy(queries.COPY_LATE_RECORDS) as copy:
        for offset, seq, start, end, t, mark, o in late:
            copy.write_row(
                (
                    job,
                    operator,
                    out.source,
                    out.partition,
                    offset,
                    seq,
                    epoch_dt(start),
                    epoch_dt(end),
                    epoch_dt(t),
                    epoch_dt(mark),
                    orjson.dumps(o, default=str).decode(),
                )
            )


def _with_accs(out: BatchOutput, accs: dict[Any, Any]) -> BatchOutput:
    """A batch output whose only slot (0, the ``rows_of`` plan's) holds ``accs``."""
    return BatchOutput(out.source, out.partition, [accs], out.dead, out.records_in)


class _Late(Exception):
    """Raised by the windowed key of :func:`tumbling_update_kernels` for a closed window."""

    def __init__(self, t: float, start: float, watermark: float, record: Any) -> None:
        self.t, self.start, self.watermark, self.record = t, start, watermark, record


class _Clock:
    """The watermark of one batch as the windowed key of :func:`tumbling_update_kernels`
    moves it: ``key`` raises :class:`_Late` for a closed window, else advances the watermark;
    ``failed`` gives a failed record's advance back."""

    __slots__ = ("as_datetime", "base", "dirty", "epoch_of", "fn", "grace", "prev", "single",
                 "size", "wm")

    def __init__(self, plan: WindowPlan, fn: Callable[[Any], Any]) -> None:
        assert plan.window.grace is not None  # a plain window has no window plan
        self.grace: float = plan.window.grace
        self.epoch_of, self.base, self.as_datetime = plan.epoch_of, plan.base_fn, plan.as_datetime
        self.size, self.single = plan.size, plan.width == 1
        self.fn = fn
        self.wm: float | None = None
        self.prev: float | None = None
        self.dirty = False

    def set(self, wm: float | None) -> None:
        """Continue from watermark ``wm``."""
        self.wm = wm
        self.dirty = False

    def first(self, v: Any) -> Any:
        """The steps, noting that a new record starts (nothing of it to give back yet)."""
        self.dirty = False
        return self.fn(v)

    def key(self, o: Any) -> Any:
        """The record's key and window start; the watermark advanced by its time."""
        t = self.epoch_of(o)
        s = t - t % self.size
        wm = self.wm
        if wm is not None and s + self.size + self.grace < wm:  # WindowSpec.closed, inlined
            raise _Late(t, s, wm, o)
        k = self.base(o)
        self.prev = wm
        if wm is None or t > wm:
            self.wm = t
            self.dirty = True
        ws = self.as_datetime(s)
        return (k, ws) if self.single else (*k, ws)

    def failed(self, exc: BaseException | None) -> _Late | None:
        """A failure's late record, or (a real failure) the record's advance given back."""
        if isinstance(exc, _Late):
            return exc
        if exc is not None and self.dirty:
            self.set(self.prev)
        return None

    def late_row(self, offset: int, late: _Late) -> LateRow:
        """The late record of ``late`` at ``offset``."""
        s = late.start
        return (offset, 0, s, s + self.size, late.t, late.watermark, late.record)


def tumbling_update_kernels(plan: WindowPlan, fn: Callable[[Any], Any]) -> Kernels:
    """Tumbling windows in update mode on the aggregate kernels
    (:func:`pgstream.runtime.kernels.aggregate_kernels`) whose key is the record's window
    (:class:`_Clock`): a late record comes back through ``fail`` as :class:`_Late`."""
    clock = _Clock(plan, fn)
    run_raw, run_records = kernels.aggregate_kernels(clock.first, clock.key, plan.aggs)

    def raw(batch: Any, slot: WindowSlot, fail: kernels.RawFail) -> None:
        payloads = batch.payloads
        cursor = [0]

        def on_fail(payload: bytes, value: Any, exc: BaseException | None) -> None:
            late = clock.failed(exc)
            if late is None:
                # the general path may evaluate it (a payload decodable after all)
                slot.watermark = clock.wm
                fail(payload, value, exc)
                if slot.watermark != clock.wm:
                    clock.set(slot.watermark)
                return
            i = cursor[0]
            while payloads[i] is not payload:
                i += 1
            cursor[0] = i + 1
            slot.late.append(clock.late_row(batch.offset(i), late))

        clock.set(slot.watermark)
        try:
            run_raw(batch, slot.accs, on_fail)
        finally:
            slot.watermark = clock.wm

    def records(recs: Any, slot: WindowSlot, fail: kernels.RecordFail) -> None:
        def on_fail(rec: Any, exc: BaseException | None) -> None:
            late = clock.failed(exc)
            if late is None:
                fail(rec, exc)
            else:
                slot.late.append(clock.late_row(rec.offset, late))

        clock.set(slot.watermark)
        try:
            run_records(recs, slot.accs, on_fail)
        finally:
            slot.watermark = clock.wm

    return raw, records


def continue_watermark(out: BatchOutput, slot_index: int, committed: float | None) -> Any:
    """Open a window plan's slot of ``out`` (a :class:`WatermarkSlot` with ``before``: a
    :class:`WindowSlot` or a session slot): the batch continues the previous batch's watermark
    while that batch has not committed, else the committed one. Returns the slot."""
    slot = out.slots[slot_index]
    before = out.pending.get(slot_index) if out.pending else None
    slot.before = before
    slot.watermark = committed
    if before is not None and before.watermark is not None:
        slot.watermark = before.watermark
    return slot

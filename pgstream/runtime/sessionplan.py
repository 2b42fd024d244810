"""The session window sink plan: ``key_by(...).window(ps.session(gap=...), ...).aggregate(...)``.

A :class:`SessionPlan` evaluates records in offset order like a
:class:`~pgstream.runtime.windowplan.WindowPlan` (same watermark, same late records), but a
record's window is its key's session (the rules are :mod:`pgstream.operators.sessions`'s):
it may extend a session, start one, or bridge two and merge them. Every key's sessions (start,
last event time, accumulators) live in ``pgstream.state`` (one entry per key), written in the
batch transaction and reloaded on takeover.

The sink row of a session is keyed by key + ``window_start`` (the session's start) and holds
``window_end`` (last event + gap) when the table has that column. In update mode the batch
transaction deletes the rows of the sessions that merged or moved and writes the sessions the
batch changed with their full accumulators, so the sink always holds exactly the current
sessions; in final mode a session's row is written once, in the batch whose watermark closes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from pgstream.api import SinkSpec
from pgstream.operators.sessions import Run, Runs, Session, SessionRules
from pgstream.runtime.output import BatchOutput
from pgstream.runtime.sinkplans import AggregatePlan, Expectations, SinkPlan, aggregate_row
from pgstream.runtime.windowplan import WatermarkSlot, continue_watermark, epoch_dt, write_late
from pgstream.sinks.upsert import AggregateSink, Row
from pgstream.state.windows import WindowState

#: the optional sink column of a session's end
END_COLUMN = "window_end"


@dataclass(slots=True)
class SessionSlot(WatermarkSlot):
    """A batch's output of one session plan."""

    #: key -> its sessions after the records evaluated so far (keys the batch touched)
    runs: dict[Any, Runs] = field(default_factory=dict)
    #: the previous batch's slot while it has not committed
    before: SessionSlot | None = None
    #: the watermark the batch started from
    start: float | None = None
    #: key -> its sessions before the batch (:meth:`SessionPlan._prior`, cached)
    priors: dict[Any, Runs] = field(default_factory=dict)
    #: the batch's result, computed once when it is written (:meth:`SessionPlan.result`)
    done: Result | None = None


@dataclass(slots=True)
class Result:
    """What a batch writes: the sessions to keep per key, sink rows to delete and to write."""

    #: key -> its sessions as committed after the batch (empty: the key's state goes)
    keep: dict[Any, Runs]
    #: sink keys of rows to delete (update mode: merged or moved sessions)
    deleted: list[Any]
    #: sink key -> the session of a row to write
    written: dict[Any, Run]


class SessionPlan(SinkPlan):
    """key_by + session window + aggregate."""

    ORDER = AggregatePlan.ORDER
    CARRIES_OVER = True

    def __init__(self, spec: SinkSpec, sink: AggregateSink, state: WindowState) -> None:
        window = spec.window
        assert window is not None and window.key is not None and spec.key is not None
        assert isinstance(window.kind, Session) and window.grace is not None
        self.rows_of = AggregatePlan(spec, sink)
        self.table = spec.table
        self.sink = sink
        self.chain = self.rows_of.chain
        self.aggs = self.rows_of.aggs
        self.extract = self.rows_of.extract
        self.key = spec.key
        self.label = f"session->{spec.table}"
        self.rules = SessionRules(window.kind.seconds, window.grace, self.aggs)
        self.final = window.emit == "final"
        self.state = state
        self.operator = spec.operator_id
        self.epoch_of = window.clock.epoch_of
        self.base_fn: Callable[[Any], Any] = window.key.fn
        self.width = len(spec.key.columns) - 1
        #: the committed sessions by key (parsed from the state loaded on takeover)
        self._committed: dict[Any, Runs] = {}
        for kj, blob in state.values.items():
            k = orjson.loads(kj)
            key = tuple(k) if isinstance(k, list) else k
            self._committed[key] = tuple(Run.from_json(r) for r in orjson.loads(blob))
        state.values = {}

    def new_slot(self) -> SessionSlot:
        return SessionSlot()

    @property
    def sink_label(self) -> str:
        return self.sink.info.label

    # -- evaluation ---------------------------------------------------------------------------

    def opened(self, out: BatchOutput) -> None:
        """Start from the previous batch's watermark (uncommitted) or the committed one."""
        slot: SessionSlot = continue_watermark(out, self.slot, self.state.watermark)
        slot.start = slot.watermark

    def _prior(self, slot: SessionSlot, k: Any) -> Runs:
        """A key's sessions before this batch (the previous uncommitted batch's, else the
        committed ones) as kept at the batch's starting watermark: the same value however far
        the previous batch has come (evaluated, written or committed)."""
        found = slot.priors.get(k)
        if found is None:
            before = slot.before
            raw = before.runs.get(k) if before is not None else None
            if raw is None:
                raw = self._committed.get(k, ())
            found = slot.priors[k] = self.rules.expire(raw, slot.start)[0]
        return found

    def stage(self, value: Any, out: BatchOutput) -> tuple[dict[Any, Runs], list[Any], Any]:
        """Per output record, in order: its event time, late or its key's new sessions; then
        the watermark it leaves."""
        slot: SessionSlot = out.slots[self.slot]
        wm = slot.watermark
        local: dict[Any, Runs] = {}
        late: list[Any] = []
        rules = self.rules
        for seq, o in enumerate(self.chain(value)):
            t = self.epoch_of(o)
            if wm is not None and t + rules.gap + rules.grace < wm:
                late.append((seq, t, t + rules.gap, t, wm, o))
                continue  # its key and inputs are not read
            k = self.base_fn(o)
            runs = local.get(k)
            if runs is None:
                runs = slot.runs.get(k)
                if runs is None:
                    runs = self._prior(slot, k)
            closed = rules.late(runs, t, wm)
            if closed is not None:
                assert wm is not None
                late.append((seq, closed[0], closed[1], t, wm, o))
                continue
            xs = [None if ex is None else ex(o) for ex in self.extract]
            local[k] = rules.add(runs, t, xs)
            if wm is None or t > wm:
                wm = t
        return local, late, wm

    def apply(
        self, staged: tuple[dict[Any, Runs], list[Any], Any], offset: int, out: BatchOutput
    ) -> None:
        local, late, wm = staged
        slot: SessionSlot = out.slots[self.slot]
        slot.runs.update(local)
        slot.take(late, offset, wm)

    # -- the batch's result -------------------------------------------------------------------

    def _sink_key(self, k: Any, start: float) -> Any:
        ws = epoch_dt(start)
        return (k, ws) if self.width == 1 else (*k, ws)

    def _candidates(self, slot: SessionSlot) -> dict[Any, Runs]:
        """Every key the batch changes: those its records touched, and those whose sessions
        the batch's watermark closes or forgets."""
        found = {k: self._prior(slot, k) for k in slot.runs}
        wm = slot.watermark
        if wm is None:
            return found
        deadline = self.rules.deadline
        before = slot.before.runs if slot.before is not None else {}
        for source in (self._committed, before):
            for k in source:
                if k not in found:
                    prior = self._prior(slot, k)
                    if prior and deadline(prior) < wm:
                        found[k] = prior
        return found

    def result(self, out: BatchOutput) -> Result:
        """The sessions kept, the rows deleted and written by this batch (computed once)."""
        slot: SessionSlot = out.slots[self.slot]
        if slot.done is not None:
            return slot.done
        res = Result({}, [], {})
        wm = slot.watermark
        for k, prior in self._candidates(slot).items():
            after = slot.runs.get(k, prior)
            res.keep[k], closing = self.rules.expire(after, wm)
            if self.final:
                for run in closing:
                    res.written[self._sink_key(k, run.start)] = run
                continue
            for run in after:
                if run.accs is not None and run not in prior:
                    res.written[self._sink_key(k, run.start)] = run
            for p in prior:
                if p.accs is not None and p not in after:
                    res.deleted.append(self._sink_key(k, p.start))
        slot.done = res
        return res

    # -- the batch transaction ----------------------------------------------------------------

    def _state_key(self, k: Any) -> str:
        return orjson.dumps(list(k) if isinstance(k, tuple) else k).decode()

    def write_state(self, cur: psycopg.Cursor[Any], out: BatchOutput) -> None:
        """The watermark into the partition row; the changed keys' sessions into the state."""
        slot: SessionSlot = out.slots[self.slot]
        self.state.write_watermark(cur, slot.watermark)
        res = self.result(out)
        key = self._state_key
        self.state.write(
            cur,
            {
                key(k): orjson.dumps([r.to_json() for r in runs])
                for k, runs in res.keep.items()
                if runs
            },
        )
        self.state.delete(cur, [key(k) for k, runs in res.keep.items() if not runs])

    def rows(self, written: dict[Any, Run]) -> tuple[tuple[str, ...], list[Row]]:
        """The value columns and sink rows of ``written`` (``window_end`` when the table has
        that column)."""
        columns = self.sink.value_columns()
        with_end = END_COLUMN in self.sink.info.columns
        rows = []
        for sk, run in written.items():
            assert run.accs is not None
            row = aggregate_row(self.key, self.aggs, sk, list(run.accs))
            rows.append((*row, epoch_dt(self.rules.end(run))) if with_end else row)
        return ((*columns, END_COLUMN) if with_end else columns), rows

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """Late records; the merged or moved sessions' rows deleted; the changed (update) or
        closed (final) sessions' rows written."""
        slot: SessionSlot = out.slots[self.slot]
        write_late(cur, self.state.job, self.operator, out, slot.late)
        res = self.result(out)
        self.sink.delete(cur, [*res.deleted, *res.written])
        columns, rows = self.rows(res.written)
        self.sink.write(cur, columns, rows)
        return len(rows)

    def committed(self, out: BatchOutput) -> None:
        """Adopt the batch's watermark and sessions."""
        slot: SessionSlot = out.slots[self.slot]
        slot.before = None
        res = self.result(out)
        for k, runs in res.keep.items():
            if runs:
                self._committed[k] = runs
            else:
                self._committed.pop(k, None)
        if slot.watermark is not None:
            self.state.watermark = slot.watermark

    def expect(self, out: BatchOutput, partition: str, expected: Expectations) -> None:
        """The rows the sink must hold, the sessions the state must hold, the late records."""
        slot: SessionSlot = out.slots[self.slot]
        late = expected.late[self.operator]
        for offset, seq, start, _end, t, mark, _o in slot.late:
            # a session starts at an event time: as stored (microseconds)
            stored = epoch_dt(start).timestamp()
            late[(out.source, partition, offset, seq, stored)] = (t, mark)
        res = self.result(out)
        accs = expected.accumulators[self.table]
        for sk in res.deleted:
            accs.pop(sk, None)
        for sk, run in res.written.items():
            assert run.accs is not None
            accs[sk] = list(run.accs)
        states = expected.states
        for k, runs in res.keep.items():
            skey = (self.operator, partition, self._state_key(k))
            if runs:
                states[skey] = [r.to_json() for r in runs]
            else:
                states.pop(skey, None)

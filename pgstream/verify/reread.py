"""Re-reading each source over its committed range and replaying it through the app's own
operators (:class:`~pgstream.runtime.pipeline.Pipeline`, folds from empty state), segment by
segment of the ledger, into :class:`~pgstream.verify.expected.Expected`."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import psycopg
import psycopg.errors

from pgstream.api import App
from pgstream.operators.lookup import lookups_in
from pgstream.runtime.pipeline import Pipeline, new_states
from pgstream.sources.base import OpenContext, PartitionReader, Source, SourceError, SourceRecord
from pgstream.verify.expected import Expected
from pgstream.verify.judge import PlanJudge
from pgstream.verify.ledger import Partition, Segment, check_count, load_ledger, segments
from pgstream.verify.report import CannotVerify, VerifyReport

#: dead letters the runtime writes itself (not produced by re-evaluating the operators)
RUNTIME_DEAD_OPERATORS = frozenset({"sink", "worker"})
#: seconds a source may return nothing inside the committed range before verify gives up
READ_TIMEOUT = 30.0


@runtime_checkable
class RangeReader(Protocol):
    """A reader that can read a range known to be final without waiting for anything (a
    table's :meth:`~pgstream.sources.table.TableReader.read_range`)."""

    def read_range(self, start: int, end: int, limit: int) -> list[SourceRecord]:
        """Up to ``limit`` records with ``start <= offset < end``, in offset order."""
        ...


def read_range(
    source: Source, reader: PartitionReader, start: int, end: int, chunk: int
) -> Iterator[SourceRecord]:
    """Every record of ``[start, end)``, in offset order; raise if the source lacks some."""
    if isinstance(reader, RangeReader):
        yield from _read_final_range(source, reader, start, end, chunk)
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


def _read_final_range(
    source: Source, reader: RangeReader, start: int, end: int, chunk: int
) -> Iterator[SourceRecord]:
    """A table's committed range, read directly: every row below a committed offset was
    already below the reader's safe horizon when it was committed, so there is nothing to
    wait for (the horizon would only add latency under concurrent writers)."""
    pos = start
    while pos < end:
        try:
            records = reader.read_range(pos, end, chunk)
        except (SourceError, psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise CannotVerify(
                f"{source.describe()} cannot be re-read over the committed range: {exc}"
            ) from exc
        yield from records
        if len(records) < chunk:
            return
        pos = records[-1].offset + 1


class _Operators:
    """The app's operators for one partition, per subset of its sinks (a segment's plan may
    have had fewer), sharing the fold states replayed from empty."""

    def __init__(self, app: App, p: Partition, sinks: dict[str, Any]) -> None:
        self.app = app
        self.p = p
        self.sinks = sinks
        self.states = new_states(app, p.source, p.partition)
        self._pipelines: dict[tuple[int, ...], Pipeline] = {}

    def only(self, indices: tuple[int, ...]) -> Pipeline:
        """The operators of the sinks ``indices`` only."""
        if indices not in self._pipelines:
            subset = copy.copy(self.app)
            subset.sinks = [self.app.sinks[i] for i in indices]
            # a handler's records after a lookup depend on the table as of each commit
            subset.handlers = [h for h in self.app.handlers if not lookups_in(h.steps)]
            pipeline = Pipeline(subset, self.p.source, self.p.partition, self.sinks, self.states)
            pipeline.on_error = "dead_letter"
            self._pipelines[indices] = pipeline
        return self._pipelines[indices]


def audit_partition(
    conn: psycopg.Connection[Any],
    app: App,
    dsn: str,
    source: Source,
    p: Partition,
    sinks: dict[str, Any],
    stored_dead: dict[int, str],
    expected: Expected,
    report: VerifyReport,
    chunk: int,
    judge: PlanJudge,
) -> None:
    """Check partition ``p``'s ledger and replay its committed range into ``expected``."""
    ledger = load_ledger(conn, app.name, p)
    segs = segments(ledger, source.initial_offset(p.partition), p, report)
    report.batches += len(ledger)
    if not segs:
        return
    operators = _Operators(app, p, sinks)
    runtime_dead = {off for off, op in stored_dead.items() if op in RUNTIME_DEAD_OPERATORS}
    # a repartitioned fold: its hand-over runs in its upstream stream's partitions
    mine = [
        i
        for i, spec in enumerate(app.sinks)
        if spec.stream == p.source
        or (spec.repartition is not None and spec.repartition.upstream == p.source)
    ]
    looked = any(lookups_in(h.steps) for h in app.handlers if h.stream == p.source)
    dead = expected.dead[(p.source, p.partition)]
    try:
        reader = source.open(p.partition, OpenContext(dsn))
    except SourceError as exc:
        raise CannotVerify(f"{source.describe()} cannot be opened: {exc}") from exc
    try:
        low = reader.retained_from()
        gone = _Gone(app, p, mine, stored_dead, expected, report)
        segs = gone.below(segs, low)
        if not segs:
            return
        begin = segs[0].start if low is None else max(segs[0].start, low)
        stream = read_range(source, reader, begin, segs[-1].end, chunk)
        for seg, records in _by_segment(stream, segs):
            if low is not None and seg.start < low and len(records) != seg.records_in:
                gone.mark(seg.start, seg.end)  # partly below the retained start
                continue
            check_count(seg, records, source, p, report)
            report.records += len(records)
            status = judge.status(seg.version)
            changed = [i for i in mine if status[i] == "changed"]
            pipeline = operators.only(tuple(i for i in mine if status[i] == "same"))
            # A sink path that ran other code may have dead-lettered a record: every stored
            # dead letter of the range then stands for its record.
            accepted = set(stored_dead) if changed or looked else runtime_dead
            judge.skip(changed, seg.version, p, seg.start, seg.end, expected)
            live = [r for r in records if r.offset not in accepted]
            dead.update(r.offset for r in records if r.offset in accepted)
            out = pipeline.evaluate(live)
            dead.update(d.offset for d in out.dead)
            for plan in pipeline.plans:
                plan.committed(out)  # the next batch's folds continue from this one
                plan.expect(out, p.partition, expected.plans)
    finally:
        reader.close()


class _Gone:
    """Ranges of one partition the source no longer holds (broker retention): their outputs
    cannot be recomputed, so they are not checked (a note says so) instead of failing the
    whole audit. Append rows in them are skipped, their dead letters accepted, and keyed
    sinks of the stream (aggregates, folds: they sum over those records) are not checked."""

    def __init__(
        self,
        app: App,
        p: Partition,
        mine: list[int],
        stored_dead: dict[int, str],
        expected: Expected,
        report: VerifyReport,
    ) -> None:
        self.app, self.p, self.mine = app, p, mine
        self.stored_dead, self.expected, self.report = stored_dead, expected, report

    def below(self, segs: list[Segment], low: int | None) -> list[Segment]:
        """Mark the segments wholly below ``low``; return the others."""
        if low is None or not segs or segs[0].end > low:
            return segs
        gone = [s for s in segs if s.end <= low]
        self.mark(gone[0].start, gone[-1].end)
        return [s for s in segs if s.end > low]

    def mark(self, start: int, end: int) -> None:
        """``[start, end)`` cannot be re-read: not checked."""
        where = (self.p.source, self.p.partition)
        self.report.unchecked.append(
            f"{self.p.source}/{self.p.partition} offsets [{start}, {end}): the source no longer "
            "holds them (retention or trimming), so their effects cannot be recomputed"
        )
        self.expected.dead[where].update(o for o in self.stored_dead if start <= o < end)
        for i in self.mine:
            spec = self.app.sinks[i]
            if spec.kind == "append":
                ranges = self.expected.skip_append[spec.table][where]
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], end)
                else:
                    ranges.append((start, end))
            else:
                self.expected.unchecked_tables.setdefault(
                    spec.table,
                    f"{spec.table}: records of {self.p.source}/{self.p.partition} before offset "
                    f"{end} are no longer in the source, so its keyed results cannot be "
                    "recomputed",
                )


def _by_segment(
    stream: Iterator[SourceRecord], segs: list[Segment]
) -> Iterator[tuple[Segment, list[SourceRecord]]]:
    """Each segment with the records of ``stream`` (in offset order) that fall in it."""
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
        yield seg, records

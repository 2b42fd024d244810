"""``pgstream rewind``: move a partition's committed offset back and retract exactly the
effects of the records beyond it, in ONE transaction fenced like a batch.

``--to OFFSET`` means: records with ``offset >= OFFSET`` are processed again. OFFSET must be
a batch boundary (the start of a committed batch, or the committed offset itself): the
ledger knows which plan version wrote each batch, and a batch is retracted whole or not at
all. A straddling OFFSET is refused with the two boundaries around it. ``--to-time TIME`` is
first turned into such a boundary (:mod:`pgstream.rewindtime`).

The transaction:

1. **Lock** the partition row ``FOR UPDATE`` (a batch in flight holds it until its COMMIT:
   rewind waits for it up to ``--wait`` seconds, default 10, then refuses). A live worker that
   leases the row is *fenced*, not waited for: the epoch is bumped and the lease cleared, so
   its next checkpoint (a compare-and-set on epoch and offset) fails, and it claims the row
   again, reading from OFFSET.
2. **Check** that every effect of the stream can be retracted exactly (append and
   count/sum/avg aggregate sinks only), that today's plan is the job's recorded plan and
   wrote every batch of the range, and that no range was skipped (``on_lost``).
3. **Re-read** ``[OFFSET, committed)`` from the source (a source that no longer holds it is
   refused) and evaluate it with today's operators, leaving out the records whose open dead
   letter says they wrote nothing; the count must match the ledger's ``records_in``.
4. **Retract**: aggregate sinks get the negated deltas merged (count, sum, avg's running sum
   and count); append rows with ``(_source, _partition) = (S, P) AND _offset >= OFFSET``,
   dead letters and late records of the range, and the ledger rows are deleted.
5. **Move** the partition row to OFFSET with a new epoch, then ``COMMIT``. A crash before it
   changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql

from pgstream import plan as plans
from pgstream.admin import Outcome
from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.errors import ConfigError, JobStateError
from pgstream.operators.lookup import lookups_in
from pgstream.runtime.crashpoints import crash_point
from pgstream.runtime.jobcheck import PlanChangedError
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.runtime.pushdown import PushedPlan
from pgstream.runtime.sinkplans import AggregatePlan
from pgstream.runtime.worker import build_sinks
from pgstream.sinks.introspect import load_table
from pgstream.sources.base import OpenContext, Source, SourceError, SourceRecord
from pgstream.verify.report import CannotVerify
from pgstream.verify.reread import read_range

Cursor = psycopg.Cursor[Any]

#: seconds rewind waits for a batch in flight to release the partition row
LOCK_WAIT_SECONDS = 10.0
#: records re-read and evaluated at a time
CHUNK = 2000
#: aggregate kinds whose deltas can be subtracted
RETRACTABLE = frozenset({"count", "sum", "avg"})

REBUILD_HINT = (
    "re-process stream {stream} from the start with `pgstream rebuild MODULE:APP` (it replays "
    "the job into shadow tables and swaps them in atomically; --sink T rebuilds some sinks, "
    "as an app with @app.batch handlers needs), or start the stream over with `pgstream job "
    "reset MODULE:APP --stream {stream} --delete-outputs --yes` (clear its aggregate and fold "
    "tables yourself) and run the job again"
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where to rewind: a partition of a stream, back to ``to``."""

    source: str
    partition: str
    to: int

    def params(self, job: str) -> dict[str, Any]:
        """The parameters of the ``queries.REWIND_*`` statements."""
        return {"job": job, "source": self.source, "partition": self.partition, "to": self.to}


def check_retractable(app: App, stream: str) -> None:
    """Refuse a stream with an effect rewind cannot retract exactly, naming it."""
    problems = [p for spec in app.sinks for p in _sink_problems(spec, stream)]
    problems += [
        f"@app.batch handler {h.name!r} (its effects are the handler's own writes)"
        for h in app.handlers
        if h.stream == stream
    ]
    if problems:
        raise ConfigError(
            f"stream {stream!r} cannot be rewound exactly: "
            + "; ".join(problems)
            + ". Rewind only retracts append rows and count/sum/avg aggregates",
            hint=REBUILD_HINT.format(stream=stream),
        )


def _sink_problems(spec: SinkSpec, stream: str) -> Iterator[str]:
    if spec.repartition is not None and spec.repartition.upstream == stream:
        yield f"sink {spec.table!r} is fed through a repartition table (stage 1 of a fold)"
        return
    if spec.stream != stream:
        return
    if spec.kind == "fold":
        yield f"fold sink {spec.table!r} (per-key state built in record order)"
    if spec.kind == "aggregate":
        kinds = sorted({a.kind for a in spec.aggregates} - RETRACTABLE)
        if kinds:
            yield f"aggregate sink {spec.table!r} has {'/'.join(kinds)} (cannot be subtracted)"
        if spec.window is not None and not spec.window.plain:
            yield (
                f"aggregate sink {spec.table!r} has a window with grace, emit='final' or "
                "hopping (watermark state)"
            )
    if lookups_in(spec.steps):
        yield f"sink {spec.table!r} enriches records with a lookup (the table may have changed)"


class Rewinder:
    """Rewinds one partition of a job (see the module docstring)."""

    def __init__(
        self,
        app: App,
        conn: psycopg.Connection[Any],
        dsn: str,
        lock_wait: float = LOCK_WAIT_SECONDS,
    ) -> None:
        self.app = app
        self.conn = conn
        self.dsn = dsn
        #: seconds to wait for a batch in flight to release the partition row
        self.lock_wait = lock_wait

    def target(self, stream: str, partition: str | None, to: int) -> Target:
        """The partition to rewind: ``partition``, or the stream's only one."""
        return Target(stream, self.partition_of(stream, partition), to)

    def partition_of(self, stream: str, partition: str | None) -> str:
        """``partition``, or the stream's only one (ConfigError naming them otherwise)."""
        if stream not in self.app.sources:
            raise ConfigError(
                f"stream {stream!r} is not in app {self.app.name!r} "
                f"(its streams: {', '.join(self.app.sources)})",
                hint="give --source one of the app's streams",
            )
        if partition is None:
            parts = [
                r[0]
                for r in self.conn.execute(
                    queries.REWIND_PARTITIONS, {"job": self.app.name, "source": stream}
                )
            ]
            if len(parts) != 1:
                raise ConfigError(
                    f"stream {stream!r} has {len(parts)} partitions "
                    f"({', '.join(parts[:8]) or 'none committed yet'}): offsets are per "
                    "partition",
                    hint="name one with --partition P",
                )
            partition = parts[0]
        return partition

    def run(self, t: Target, *, apply: bool) -> Outcome:
        """Rewind ``t`` in one transaction (rolled back unless ``apply``: a dry run)."""
        check_retractable(self.app, t.source)
        outcome = Outcome(applied=apply)
        p = t.params(self.app.name)
        with self.conn.transaction(force_rollback=not apply), self.conn.cursor() as cur:
            committed, owner = self._lock(cur, t, outcome)
            if committed is None:
                outcome.applied = False
                return outcome
            batches, records, first = self._check_ledger(cur, t, committed)
            self._check_skips(cur, t)
            where = f"{t.source}/{t.partition}"
            outcome.add(
                f"rewind {where} of job {self.app.name!r} from {committed} back to {t.to}: "
                f"records with offset >= {t.to} are processed again"
            )
            if owner is not None:
                outcome.add(f"  worker {owner} leases the partition: it is fenced (epoch bumped)")
            pipeline, out = self._replay(cur, t, committed, records)
            self._retract_aggregates(cur, pipeline, out, outcome)
            self._delete_appends(cur, t, outcome)
            dead = _rowcount(cur, queries.REWIND_DELETE_DEAD_LETTERS, p)
            late = _rowcount(cur, queries.REWIND_DELETE_LATE_RECORDS, p)
            ledger = _rowcount(cur, queries.REWIND_DELETE_LEDGER, p)
            back = {"batches": batches, "records": records, "committed": None if first else t.to}
            cur.execute(queries.REWIND_MOVE_PARTITION, {**p, **back})
            outcome.add(f"  dead letters: {dead} deleted; late records: {late} deleted")
            outcome.add(
                f"  ledger: {ledger} batch(es) of {records} record(s) deleted; the partition's "
                "epoch is bumped (a running worker's next commit is refused and it re-reads "
                f"from {t.to})"
            )
            if apply:
                crash_point("rewind_before_commit")
        return outcome

    def _lock(self, cur: Cursor, t: Target, outcome: Outcome) -> tuple[int | None, str | None]:
        """Lock the partition row: its committed offset (None: nothing to do) and the live
        worker that leases it, if any."""
        cur.execute(queries.SET_LOCK_TIMEOUT, {"ms": str(max(1, int(self.lock_wait * 1000)))})
        try:
            row = cur.execute(queries.REWIND_LOCK_PARTITION, t.params(self.app.name)).fetchone()
        except psycopg.errors.LockNotAvailable:
            raise JobStateError(
                f"a transaction held the partition row of {t.source}/{t.partition} for more "
                f"than {self.lock_wait:g}s (a batch in flight, a redrive chunk, a job "
                "command): rewind did not change anything",
                hint="run the rewind again (--wait SECONDS waits longer), or stop the job's "
                "workers first",
            ) from None
        if row is None or row[0] is None:
            outcome.add(f"{t.source}/{t.partition} has no checkpoint: nothing to rewind")
            return None, None
        committed, owner, held = int(row[0]), row[1], bool(row[2])
        if t.to > committed:
            raise ConfigError(
                f"--to {t.to} is beyond {t.source}/{t.partition}'s committed offset "
                f"{committed}: rewind only goes back",
                hint=f"give an offset <= {committed}",
            )
        if t.to == committed:
            outcome.add(f"{t.source}/{t.partition} is at {committed} already: nothing to rewind")
            return None, None
        return committed, owner if held else None

    def _check_ledger(self, cur: Cursor, t: Target, committed: int) -> tuple[int, int, bool]:
        """(batches, records, whether OFFSET is the partition's start) of the range; refuse a
        straddled batch or another plan."""
        rows = cur.execute(queries.REWIND_LEDGER, t.params(self.app.name)).fetchall()
        if not rows or int(rows[0][0]) > t.to:
            raise JobStateError(
                f"the ledger of {t.source}/{t.partition} holds no batch starting at or before "
                f"{t.to} (it was reset, or the offset is before the job's first batch)",
                hint="rewind to an offset the job's ledger holds (the start of a committed batch)",
            )
        start, end = int(rows[0][0]), int(rows[0][1])
        if start != t.to:
            raise ConfigError(
                f"--to {t.to} falls inside the committed batch [{start}, {end}) of "
                f"{t.source}/{t.partition}: rewind retracts whole batches",
                hint=f"rewind to the batch's start (--to {start}) or its end (--to {end})",
            )
        job = cur.execute(queries.DLQ_JOB_PLAN, {"job": self.app.name}).fetchone()
        today = plans.fingerprint(plans.describe(self.app))
        if job is None or job[1] != today:
            raise PlanChangedError(
                f"the app's plan differs from the recorded plan of job {self.app.name!r}: "
                "rewind recomputes the retracted deltas with today's code, so it must be the "
                "code that wrote them",
                hint="rewind with the code the job runs, or rebuild the outputs with it "
                "(`pgstream rebuild MODULE:APP` after `pgstream run MODULE:APP --accept-changes`)",
            )
        others = sorted({r[2] for r in rows if r[2] != job[0]}, key=lambda v: (v is None, v))
        if others:
            raise PlanChangedError(
                f"batches of {t.source}/{t.partition} after offset {t.to} were written by "
                f"plan version(s) {', '.join(str(v) for v in others)}, not the current "
                f"version {job[0]}: their deltas cannot be recomputed with today's code",
                hint="rewind to an offset after the last plan change, or rebuild the outputs "
                "with today's code (`pgstream rebuild MODULE:APP`)",
            )
        if int(rows[-1][1]) != committed:
            raise JobStateError(
                f"the ledger of {t.source}/{t.partition} ends at {rows[-1][1]}, its committed "
                f"offset is {committed}: run `pgstream verify` before rewinding"
            )
        first = rows[0][4] is None
        initial = self.app.sources[t.source].initial_offset(t.partition)
        if first and t.to != initial:
            raise JobStateError(
                f"--to {t.to} is the start of {t.source}/{t.partition}'s first batch, but the "
                f"source starts a partition at {initial}: rewind cannot move it back exactly",
                hint=REBUILD_HINT.format(stream=t.source),
            )
        return len(rows), sum(int(r[3]) for r in rows), first

    def _check_skips(self, cur: Cursor, t: Target) -> None:
        skip = cur.execute(queries.REWIND_SKIPS, t.params(self.app.name)).fetchone()
        if skip is not None:
            raise JobStateError(
                f"offsets [{skip[0]}, {skip[1]}) of {t.source}/{t.partition} were skipped "
                f"({skip[2]}): the source lost them, so their effects cannot be recomputed",
                hint=f"rewind to an offset >= {skip[1]}",
            )

    def _replay(
        self, cur: Cursor, t: Target, committed: int, records_in: int
    ) -> tuple[Pipeline, BatchOutput]:
        """The range's records through today's operators (open dead letters left out)."""
        source = self.app.sources[t.source]
        sinks = build_sinks(self.app)
        for sink in sinks.values():
            sink.bind(self.conn)
        pipeline = Pipeline(self.app, t.source, t.partition, sinks, {})
        pipeline.on_error = "dead_letter"
        p = t.params(self.app.name)
        dead = {int(r[0]) for r in cur.execute(queries.REWIND_OPEN_DEAD_OFFSETS, p)}
        out: BatchOutput | None = None
        seen = 0
        for chunk in _chunks(self._read(source, t, committed)):
            seen += len(chunk)
            live = [r for r in chunk if r.offset not in dead]
            out = pipeline.evaluate(live, into=out)
        if seen != records_in:
            raise JobStateError(
                f"{source.describe()} now holds {seen} record(s) in [{t.to}, {committed}), "
                f"the ledger says {records_in} were committed there: the source changed, so "
                "the retracted deltas cannot be recomputed",
                hint=REBUILD_HINT.format(stream=t.source),
            )
        return pipeline, out if out is not None else pipeline.evaluate([])

    def _read(self, source: Source, t: Target, committed: int) -> Iterator[SourceRecord]:
        try:
            reader = source.open(t.partition, OpenContext(self.dsn))
        except SourceError as exc:
            raise JobStateError(f"{source.describe()} cannot be opened: {exc}") from exc
        try:
            yield from read_range(source, reader, t.to, committed, CHUNK)
        except CannotVerify as exc:
            raise JobStateError(
                f"rewind must re-read [{t.to}, {committed}) to retract its effects: {exc}",
                hint=REBUILD_HINT.format(stream=t.source),
            ) from None
        finally:
            reader.close()

    def _retract_aggregates(
        self, cur: Cursor, pipeline: Pipeline, out: BatchOutput, outcome: Outcome
    ) -> None:
        for found in pipeline.plans:
            plan = found.inner if isinstance(found, PushedPlan) else found
            if not isinstance(plan, AggregatePlan):
                continue
            negated = {
                k: [_negate(a.kind, v) for a, v in zip(plan.aggs, acc)]
                for k, acc in out.slots[plan.slot].items()
            }
            plan.sink.write(cur, plan.sink.value_columns(), plan.rows(negated))
            gone = self._delete_empty_keys(cur, plan)
            outcome.add(
                f"  aggregate sink {plan.table}: the deltas of {len(negated)} key(s) subtracted"
                + (f", {gone} key(s) left with no record deleted" if gone else "")
            )

    def _delete_empty_keys(self, cur: Cursor, plan: AggregatePlan) -> int:
        """Delete the rows whose ``count()`` is 0 now (none when the sink has no ``count()``)."""
        counts = [a.name for a in plan.aggs if a.kind == "count" and a.field is None]
        if not counts:
            return 0
        stmt = queries.REWIND_DELETE_EMPTY_KEYS.format(
            plan.sink.info.ident, sql.Identifier(counts[0])
        )
        return _rowcount(cur, stmt, {})

    def _delete_appends(self, cur: Cursor, t: Target, outcome: Outcome) -> None:
        tables = dict.fromkeys(
            s.table for s in self.app.sinks if s.kind == "append" and s.stream == t.source
        )
        for table in tables:
            info = load_table(cur.connection, table)
            info.require_columns(
                ("_source", "_partition", "_offset"), "rewind deletes rows by their position"
            )
            stmt = queries.REWIND_DELETE_SINK_ROWS.format(info.ident)
            rows = _rowcount(cur, stmt, t.params(self.app.name))
            outcome.add(f"  append sink {table}: {rows} row(s) deleted")


def _negate(kind: str, value: Any) -> Any:
    """The accumulator that, merged in, subtracts ``value``."""
    if kind == "avg":
        total, n = value
        return (None if total is None else -total, -n)
    return None if value is None else -value


def _chunks(records: Iterator[SourceRecord]) -> Iterator[list[SourceRecord]]:
    chunk: list[SourceRecord] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rowcount(cur: Cursor, query: Any, params: dict[str, Any]) -> int:
    cur.execute(query, params)
    return max(cur.rowcount, 0)

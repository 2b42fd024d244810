"""Dead letters after the fact: list them, show one, and redrive them through today's code.

Redrive re-runs each selected open dead letter through the app's pipeline for its stream
(the same operators and sinks a worker builds) and writes its effect exactly once. Each
chunk of dead letters is ONE transaction:

1. **Lock** the job's partition rows ``FOR KEY SHARE`` (``queries.DLQ_LOCK_PARTITIONS``): a
   live worker's checkpoint goes on (it changes no key), ``pgstream job rename|reset|retire``
   cannot interleave with the chunk.
2. **Claim** the next open dead letters ``FOR UPDATE SKIP LOCKED`` (a concurrent redrive
   takes other rows).
3. **Evaluate** each record through the pipeline: a table source's row re-read from the
   table (the values a worker and ``verify`` see), else the stored payload decoded as JSON.
4. **Write** each record's outputs in a savepoint: append rows at the record's original
   position ``(_source, _partition, _offset, _seq)`` (so verify and rewind tell them apart,
   and the unique index refuses a second copy), aggregate deltas merged by the sink,
   ``@app.batch`` handlers called with the record alone.
5. **Mark** the rows: ``redriven`` with the outcome (a compare-and-set on ``NOT redriven``),
   or, when the record fails again (operator, sink rejection, handler), still open with the
   attempt counted and the new error in ``redrive_error``.
6. ``COMMIT``. A crash before it leaves the chunk as it was; after it, its rows are no longer
   open, so a second run never applies them again.

The records are below their partition's committed offset (their batch committed them as
dead letters), so a running worker never reads them again: redrive and workers write
different records' effects and need no fencing between them. Streams with a fold (per-key
state that depends on record order) and session windows cannot take a record out of order
and are refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson
import psycopg
import psycopg.errors
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from pgstream import plan as plans
from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.errors import ConfigError
from pgstream.operators.sessions import Session
from pgstream.runtime.checkpoint import BatchRange, DuplicateOutputError, SinkDataError, write_sinks
from pgstream.runtime.crashpoints import crash_point
from pgstream.runtime.jobcheck import PlanChangedError
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.runtime.sinkplans import HandlerError
from pgstream.runtime.worker import build_sinks
from pgstream.sinks.append import AppendSink
from pgstream.sinks.upsert import UpsertSink
from pgstream.sources.base import OpenContext, PartitionReader, SourceError, SourceRecord
from pgstream.sources.table import TableReader, TableSource

log = logging.getLogger("pgstream.redrive")

Status = Literal["open", "redriven", "all"]
#: dead letters per redrive transaction
CHUNK = 500
#: errors that roll a chunk back and are worth trying again
_ROLLED_BACK = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
#: tries of a chunk rolled back by a deadlock or a serialization failure
CHUNK_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command selects (None: any)."""

    source: str | None = None
    partition: str | None = None
    operator: str | None = None
    error: str | None = None
    from_offset: int | None = None  # inclusive
    to_offset: int | None = None  # exclusive
    status: Status = "open"

    def params(self, job: str) -> dict[str, Any]:
        """The query parameters of ``queries._DLQ_FILTER``."""
        redriven = {"open": False, "redriven": True, "all": None}[self.status]
        return {
            "job": job,
            "source": self.source,
            "partition": self.partition,
            "operator": self.operator,
            "error": self.error,
            "from_offset": self.from_offset,
            "to_offset": self.to_offset,
            "redriven": redriven,
        }


@dataclass(slots=True)
class DeadLetterRow:
    """One stored dead letter (``payload`` only when shown)."""

    id: int
    source: str
    partition: str
    offset: int
    operator: str | None
    error: str
    redriven: bool
    created_at: datetime
    redriven_at: datetime | None
    redrive_outcome: str | None
    redrive_attempts: int
    redrive_error: str | None
    payload_bytes: int | None
    payload: bytes | None = None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (payload as text when it is UTF-8, else hex)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__slots__ if k != "payload"}
        for k in ("created_at", "redriven_at"):
            out[k] = out[k].isoformat() if out[k] is not None else None
        if self.payload is not None:
            try:
                out["payload"] = self.payload.decode()
            except UnicodeDecodeError:
                out["payload_hex"] = self.payload.hex()
        return out


def list_dead_letters(
    conn: psycopg.Connection[Any], job: str, filters: Filters, limit: int
) -> list[DeadLetterRow]:
    """The dead letters ``filters`` selects, oldest first, at most ``limit``."""
    rows = conn.execute(queries.DLQ_LIST, {**filters.params(job), "limit": limit}).fetchall()
    return [DeadLetterRow(*r) for r in rows]


def count_dead_letters(
    conn: psycopg.Connection[Any], job: str, filters: Filters
) -> tuple[int, int]:
    """(open, redriven) dead letters ``filters`` selects."""
    row = conn.execute(queries.DLQ_COUNT, filters.params(job)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def show_dead_letter(
    conn: psycopg.Connection[Any], job: str, dead_letter_id: int
) -> DeadLetterRow | None:
    """Dead letter ``dead_letter_id`` of ``job`` with its payload, or None."""
    row = conn.execute(queries.DLQ_SHOW, {"job": job, "id": dead_letter_id}).fetchone()
    return None if row is None else DeadLetterRow(*row)


@dataclass(slots=True)
class RedriveReport:
    """What a redrive did (or, in a dry run, would do)."""

    redriven: int = 0
    failed: int = 0
    rows: int = 0  # sink rows written (append rows and aggregate upserts)
    chunks: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, other: RedriveReport) -> None:
        """Count a committed chunk's report in."""
        self.redriven += other.redriven
        self.failed += other.failed
        self.rows += other.rows
        self.chunks += other.chunks
        self.errors.update(other.errors)


@dataclass(slots=True)
class _Claimed:
    id: int
    source: str
    partition: str
    offset: int
    payload: bytes | None
    operator: str | None


class Redriver:
    """Redrives a job's open dead letters, chunk by chunk (see the module docstring)."""

    def __init__(
        self,
        app: App,
        conn: psycopg.Connection[Any],
        filters: Filters,
        chunk: int = CHUNK,
        dsn: str | None = None,
    ) -> None:
        if filters.status != "open":
            raise ConfigError(
                f"--status {filters.status} cannot be redriven: only open dead letters are",
                hint="leave out --status (redrive selects the open ones)",
            )
        self.app = app
        self.conn = conn
        self.filters = filters
        self.chunk = max(1, chunk)
        self.params = filters.params(app.name)
        self._sinks: dict[str, AppendSink | UpsertSink] | None = None
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        #: the job's database, for re-reading table sources (None: stored payloads only)
        self.dsn = dsn
        self._readers: dict[tuple[str, str], PartitionReader | None] = {}
        self._fingerprint: str | None = None

    def check(self) -> None:
        """Refuse streams redrive cannot serve: a fold, session windows or windows with a
        watermark (grace, emit="final") among its sinks."""
        selected = {r[0] for r in self.conn.execute(queries.DLQ_SOURCES, self.params)}
        ordered = {s.stream for s in self.app.sinks if s.kind == "fold" or _watermarked(s)}
        folds = sorted(ordered & selected)
        if folds:
            raise ConfigError(
                f"stream(s) {', '.join(folds)} feed a fold or session windows or windows with "
                "a watermark (grace, emit='final'), whose per-key state or closed windows depend "
                "on the order of records: a dead letter redriven later would be applied out of "
                "order (into a window already closed or written as final), so redrive refuses "
                "them",
                hint="redrive other streams with --source S; for these, fix the code, record "
                "it (`pgstream run MODULE:APP --accept-changes`) and rebuild the job (`pgstream "
                "rebuild MODULE:APP`): the replay's dead letters replace the stream's",
            )

    def run(self, *, apply: bool) -> RedriveReport:
        """Redrive every selected open dead letter; without ``apply`` each chunk is rolled
        back (a dry run whose counts are what ``apply`` would do)."""
        self.check()
        try:
            return self._run(apply)
        finally:
            for reader in self._readers.values():
                if reader is not None:
                    reader.close()

    def _run(self, apply: bool) -> RedriveReport:
        report = RedriveReport()
        after = 0
        while True:
            # A deadlock with a worker's upsert (both lock aggregate rows) or a serialization
            # failure rolls the whole chunk back: it is tried again from the same place.
            for attempt in Retrying(
                retry=retry_if_exception_type(_ROLLED_BACK),
                wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
                stop=stop_after_attempt(CHUNK_ATTEMPTS),
                before_sleep=_log_retry,
                reraise=True,
            ):
                with attempt:
                    step = RedriveReport()
                    last = self._chunk_transaction(apply, after, step)
            if last is None:
                return report
            report.add(step)
            after = last
            if apply:
                crash_point("redrive_after_commit")

    def _chunk_transaction(self, apply: bool, after: int, step: RedriveReport) -> int | None:
        """One chunk in one transaction (rolled back unless ``apply``): the last dead letter
        id it claimed, or None when none is left."""
        with self.conn.transaction(force_rollback=not apply), self.conn.cursor() as cur:
            cur.execute(queries.DLQ_LOCK_PARTITIONS, self.params)
            self._check_plan(cur)
            claimed = [
                _Claimed(*r)
                for r in cur.execute(
                    queries.DLQ_CLAIM, {**self.params, "after": after, "limit": self.chunk}
                ).fetchall()
            ]
            if not claimed:
                return None
            self._chunk(cur, claimed, step)
            step.chunks += 1
            if apply:
                crash_point("redrive_before_commit")
        return claimed[-1].id

    def _check_plan(self, cur: psycopg.Cursor[Any]) -> None:
        """Refuse when the app's plan is not the job's recorded one: redrive writes with the
        code the job's workers run, never with a plan it has not accepted."""
        if self._fingerprint is None:
            self._fingerprint = plans.fingerprint(plans.describe(self.app))
        row = cur.execute(queries.DLQ_JOB_PLAN, {"job": self.app.name}).fetchone()
        if row is not None and row[1] != self._fingerprint:
            raise PlanChangedError(
                f"the app's plan differs from the recorded plan of job {self.app.name!r} "
                f"(version {row[0]}): redrive runs only the plan the job has accepted",
                hint="after changing the code, run `pgstream run MODULE:APP --accept-changes` "
                "(it records the new plan), then redrive",
            )

    def _chunk(
        self, cur: psycopg.Cursor[Any], claimed: list[_Claimed], report: RedriveReport
    ) -> None:
        done: list[tuple[int, str]] = []
        failed: list[tuple[int, str]] = []
        for d in claimed:
            outcome = self._one(cur, d)
            if outcome[0]:
                done.append((d.id, outcome[1]))
                report.rows += outcome[2]
            else:
                failed.append((d.id, outcome[1]))
                report.errors[outcome[1][:200]] += 1
        if done:
            cur.execute(
                queries.DLQ_MARK_REDRIVEN,
                {
                    "job": self.app.name,
                    "ids": [i for i, _ in done],
                    "outcomes": [o for _, o in done],
                },
            )
            if cur.rowcount != len(done):  # the claim holds the rows: cannot happen
                raise RuntimeError("dead letters changed under a redrive's row locks")
        if failed:
            cur.execute(
                queries.DLQ_MARK_FAILED,
                {
                    "job": self.app.name,
                    "ids": [i for i, _ in failed],
                    "errors": [e for _, e in failed],
                },
            )
        report.redriven += len(done)
        report.failed += len(failed)

    def _one(self, cur: psycopg.Cursor[Any], d: _Claimed) -> tuple[bool, str, int]:
        """Evaluate and write one dead letter in a savepoint: (ok, outcome or error, rows)."""
        pipeline = self._pipeline(d.source, d.partition)
        if pipeline is None:
            return False, f"stream {d.source!r} is no longer in the app", 0
        rec = self._reread(d) or _record(d)
        if rec.value is None:
            return False, rec.error or "the stored payload cannot be decoded", 0
        out = pipeline.evaluate([rec])
        pipeline.resolve(cur, out)  # a stream with lookups reads their rows now
        if out.dead:
            return False, f"{out.dead[0].operator}: {out.dead[0].error}", 0
        out.span = (d.offset, d.offset + 1)
        try:
            with self.conn.transaction():  # a savepoint: a rejected record leaves nothing
                written = write_sinks(cur, pipeline, out)
                self._handlers(cur, pipeline, d, out)
                for sink in self._sinks_written():
                    sink.clear_stages(cur)  # the next record's write starts from empty stages
        except SinkDataError as exc:
            return False, f"sink rejected: {exc}", 0
        except DuplicateOutputError as exc:
            return False, f"its output is in the sink already: {exc}", 0
        except HandlerError as exc:
            return False, exc.message, 0
        return True, f"{written} rows" if written != 1 else "1 row", written

    def _handlers(
        self, cur: psycopg.Cursor[Any], pipeline: Pipeline, d: _Claimed, out: BatchOutput
    ) -> None:
        rng = BatchRange(
            job=self.app.name,
            source=d.source,
            partition=d.partition,
            epoch=0,
            worker="redrive",
            committed=None,
            start=d.offset,
            end=d.offset + 1,
            head=None,
            plan_version=0,
        )
        for plan in pipeline.plans:
            plan.run_handler(cur, rng, out)

    def _reread(self, d: _Claimed) -> SourceRecord | None:
        """The record as its table source holds it now (the values a worker and ``verify``
        see: numerics as Decimals, timestamps as datetimes), or None: not a table source, or
        the row is gone (then the stored payload serves)."""
        key = (d.source, d.partition)
        if key not in self._readers:
            reader: PartitionReader | None = None
            source = self.app.sources.get(d.source)
            if self.dsn is not None and isinstance(source, TableSource):
                try:
                    reader = source.open(d.partition, OpenContext(self.dsn))
                except SourceError as exc:
                    log.warning("%s: redriving stored payloads: %s", source.describe(), exc)
            self._readers[key] = reader
        reader = self._readers[key]
        if not isinstance(reader, TableReader):
            return None
        found = reader.read_range(d.offset, d.offset + 1, 1)
        return found[0] if found and found[0].offset == d.offset else None

    def _sinks_written(self) -> list[UpsertSink]:
        return [s for s in (self._sinks or {}).values() if isinstance(s, UpsertSink)]

    def _pipeline(self, source: str, partition: str) -> Pipeline | None:
        if source not in self.app.sources:
            return None
        if self._sinks is None:
            self._sinks = build_sinks(self.app)
            for sink in self._sinks.values():
                sink.bind(self.conn)
        key = (source, partition)
        if key not in self._pipelines:
            pipeline = Pipeline(self.app, source, partition, self._sinks, {})
            pipeline.on_error = "dead_letter"
            self._pipelines[key] = pipeline
        return self._pipelines[key]


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning("redrive chunk rolled back (%s): trying it again", exc)


def _record(d: _Claimed) -> SourceRecord:
    """The dead letter's record, from its stored payload (the input's bytes, or its decoded
    value as JSON)."""
    if d.payload is None:
        return SourceRecord(d.offset, None, error="no payload was kept for this record")
    try:
        value = orjson.loads(d.payload)
    except orjson.JSONDecodeError as exc:
        return SourceRecord(d.offset, None, error=f"the stored payload is not valid JSON: {exc}")
    if type(value) is not dict:
        return SourceRecord(d.offset, None, error="the stored payload is not a JSON object")
    return SourceRecord(d.offset, value)


def _watermarked(spec: SinkSpec) -> bool:
    """A window whose rows depend on the watermark: sessions, a grace, or final rows."""
    w = spec.window
    return w is not None and (
        isinstance(w.kind, Session) or w.grace is not None or w.emit == "final"
    )

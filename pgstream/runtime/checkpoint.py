"""The batch transaction: offsets, state, outputs, dead letters and the ledger, one COMMIT.

:func:`commit_batch` sends, in one explicit transaction on the worker's connection (whose
session sets ``synchronous_commit = on``):

0. ``BEGIN``.
1. **Fence and claim**: compare-and-set the partition row (``queries.CHECKPOINT``) to the
   batch's end offset; no row back means a newer epoch, a moved offset or a newer plan
   version, and the batch is abandoned (:class:`LeaseLostError`). A pipeline with table
   lookups then reads their rows (one query each) and evaluates the batch's records
   (:meth:`Pipeline.resolve`): what commits was computed from the tables as of this
   transaction.
2. **State**: every sink plan writes its operator state (fold overlays, touched keys only).
3. **Sinks**: every sink plan writes its rows (append ``COPY``, keyed upserts merging deltas).
4. **Handlers**: every ``@app.batch`` handler runs with the transaction's cursor.
5. **Dead letters**: ``COPY`` into ``pgstream.dead_letters``; then the ranges a source's
   reset policy skipped (``on_lost``) into ``pgstream.skipped_ranges``.
6. **Ledger**: one ``pgstream.batches`` row for the offset range.
7. ``COMMIT`` -- the checkpoint. A connection lost during it leaves the outcome unknown
   (:class:`CommitOutcomeUnknown`): the caller reads the partition row instead of resending.

Plans are visited in the pipeline's fixed order in each of steps 2-4, so the statements of a
batch are always the same sequence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors

from pgstream.db import queries
from pgstream.errors import LeaseLostError
from pgstream.runtime.crashpoints import crash_point, maybe_inject_error
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.runtime.sinkplans import HandlerError
from pgstream.sinks.append import DuplicateOutputError
from pgstream.sources.base import Skip

__all__ = [
    "BatchRange",
    "CommitOutcomeUnknown",
    "DuplicateOutputError",
    "HandlerError",
    "SinkDataError",
    "commit_batch",
    "probe_sinks",
    "write_batch",
    "write_sinks",
]


@dataclass(frozen=True, slots=True)
class BatchRange:
    """Where a batch sits in its partition and under which lease it commits."""

    job: str
    source: str
    partition: str
    epoch: int
    worker: str
    committed: int | None  # the partition's committed_offset before this batch (NULL at first)
    start: int  # the batch's first offset
    end: int  # exclusive end
    head: int | None
    plan_version: int  # the job's plan version this worker runs (see pgstream.runtime.jobcheck)
    skips: tuple[Skip, ...] = ()  # ranges the source's reset policy skipped in [start, end)
    instance: str | None = None  # the stream instance read (PartitionReader.instance)

    def key(self) -> dict[str, Any]:
        """Parameters naming the partition."""
        return {"job": self.job, "source": self.source, "partition": self.partition}


class SinkDataError(Exception):
    """The database rejected a sink row (constraint, type): some record in the batch is bad.

    ``table`` is the sink table that rejected it.
    """

    def __init__(self, cause: psycopg.Error, table: str) -> None:
        super().__init__(str(cause).strip())
        self.cause = cause
        self.table = table


class CommitOutcomeUnknown(Exception):
    """The connection failed during COMMIT: the batch may or may not have landed."""


def commit_batch(
    conn: psycopg.Connection[Any],
    pipeline: Pipeline,
    rng: BatchRange,
    out: BatchOutput,
    *,
    lease_seconds: float,
    tolerate_duplicates: bool = False,
) -> int:
    """Write one batch in one transaction and commit it; return the number of sink rows.

    ``conn`` is in autocommit mode: the transaction is an explicit ``BEGIN ... COMMIT`` so
    that a failure of the COMMIT itself is told apart from a failure before it.

    Raises :class:`LeaseLostError` when the compare-and-set finds a newer epoch, a moved
    offset or a newer plan version of the job, :class:`CommitOutcomeUnknown` when the
    connection fails during COMMIT.
    """
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            written = write_batch(
                cur, pipeline, rng, out,
                lease_seconds=lease_seconds, tolerate_duplicates=tolerate_duplicates,
            )
        crash_point("before_commit")
    except BaseException:
        _rollback_quietly(conn)
        raise
    try:
        conn.execute("COMMIT")  # 7
    except psycopg.OperationalError as exc:
        raise CommitOutcomeUnknown(str(exc)) from exc
    crash_point("after_commit")
    return written


def write_batch(
    cur: psycopg.Cursor[Any],
    pipeline: Pipeline,
    rng: BatchRange,
    out: BatchOutput,
    *,
    lease_seconds: float,
    tolerate_duplicates: bool = False,
) -> int:
    """Steps 1-6 of the batch transaction in the caller's open transaction (no ``BEGIN``,
    no ``COMMIT``): :func:`commit_batch` wraps them, and ``pgstream rebuild`` writes the
    last batches of its shadow job with them inside its swap transaction. Returns the number
    of sink rows; raises :class:`LeaseLostError` when the compare-and-set fails."""
    out.span = (rng.start, rng.end)
    _fence(cur, rng, out, lease_seconds)  # 1
    pipeline.resolve(cur, out)  # 1b: lookups read in this transaction
    for plan in pipeline.plans:  # 2
        plan.write_state(cur, out)
    crash_point("after_state")
    maybe_inject_error(cur)
    written = _write_sinks(cur, pipeline, out, tolerate_duplicates)  # 3
    crash_point("after_sinks")
    for plan in pipeline.plans:  # 4
        plan.run_handler(cur, rng, out)
    _write_dead_letters(cur, rng, out)  # 5
    _write_skips(cur, rng)
    _write_ledger(cur, rng, out, written)  # 6
    return written


def _fence(cur: psycopg.Cursor[Any], rng: BatchRange, out: BatchOutput, lease: float) -> None:
    """Step 1: the compare-and-set of the partition row, or :class:`LeaseLostError`."""
    row = cur.execute(
        queries.CHECKPOINT,
        {
            **rng.key(),
            "end": rng.end,
            "start": rng.committed,
            "epoch": rng.epoch,
            "lease": lease,
            "head": rng.head,
            "records": out.records_in,
            "plan_version": rng.plan_version,
            "instance": rng.instance,
        },
    ).fetchone()
    if row is None:
        raise LeaseLostError(
            f"{rng.source}/{rng.partition}: epoch {rng.epoch} or plan version "
            f"{rng.plan_version} is stale"
        )


def _write_dead_letters(cur: psycopg.Cursor[Any], rng: BatchRange, out: BatchOutput) -> None:
    """Step 5: the batch's dead letters."""
    if not out.dead:
        return
    with cur.copy(queries.COPY_DEAD_LETTERS) as copy:
        for d in out.dead:
            copy.write_row(
                (rng.job, rng.source, rng.partition, d.offset, d.payload, d.error, d.operator)
            )


def _write_skips(cur: psycopg.Cursor[Any], rng: BatchRange) -> None:
    """Step 5, continued: the ranges the source's reset policy skipped."""
    for skip in rng.skips:
        cur.execute(
            queries.RECORD_SKIP,
            {
                **rng.key(),
                "from": skip.start,
                "to": skip.end,
                "reason": skip.reason,
                "detail": skip.detail,
                "policy": skip.policy,
                "epoch": rng.epoch,
            },
        )


def _write_ledger(
    cur: psycopg.Cursor[Any], rng: BatchRange, out: BatchOutput, written: int
) -> None:
    """Step 6: the batch's ledger row."""
    cur.execute(
        queries.LEDGER,
        {
            **rng.key(),
            "start_offset": rng.start,
            "end": rng.end,
            "start": rng.committed,
            "epoch": rng.epoch,
            "worker": rng.worker,
            "records_in": out.records_in,
            "records_out": written,
            "dead_letters": len(out.dead),
            "plan_version": rng.plan_version,
        },
    )


def _write_sinks(
    cur: psycopg.Cursor[Any], pipeline: Pipeline, out: BatchOutput, tolerate_duplicates: bool
) -> int:
    written = 0
    table = ""  # the sink being written, for SinkDataError
    out.written = {}  # a retried transaction counts afresh
    try:
        for plan in pipeline.plans:
            table = plan.sink_label
            rows = plan.write_sink(cur, out, tolerate_duplicates)
            written += rows
            if table:
                out.written[table] = out.written.get(table, 0) + rows
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        raise SinkDataError(exc, table) from exc
    return written


def write_sinks(cur: psycopg.Cursor[Any], pipeline: Pipeline, out: BatchOutput) -> int:
    """Step 3 alone, in the caller's transaction (``pgstream dlq redrive`` writes a redriven
    record's outputs with it): the number of sink rows, or :class:`SinkDataError` /
    :class:`DuplicateOutputError`."""
    return _write_sinks(cur, pipeline, out, tolerate_duplicates=False)


def probe_sinks(conn: psycopg.Connection[Any], pipeline: Pipeline, out: BatchOutput) -> (
    SinkDataError | None
):
    """Write ``out``'s sink rows in a transaction that is always rolled back: the sink's
    rejection, or ``None`` when the sinks take them. Nothing is committed, nothing fenced;
    used to tell a bad record from a sink that rejects every record."""
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            pipeline.resolve(cur, out)
            try:
                _write_sinks(cur, pipeline, out, tolerate_duplicates=False)
            except SinkDataError as exc:
                return exc
            except DuplicateOutputError:
                return None  # the row is there already: not a rejection
            return None
    finally:
        _rollback_quietly(conn)


def _rollback_quietly(conn: psycopg.Connection[Any]) -> None:
    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute("ROLLBACK")

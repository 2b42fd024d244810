"""The batch transaction: offsets, state, outputs, dead letters and the ledger, one COMMIT.

``BEGIN; compare-and-set the partition row; state; sinks; handlers; dead letters; ledger;
COMMIT`` -- the COMMIT is the checkpoint. See DESIGN.md.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors

from pgstream.api import Batch
from pgstream.db import queries
from pgstream.errors import LeaseLostError, PgStreamError
from pgstream.runtime.crashpoints import crash_point, maybe_inject_error
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.usercode import describe, format_traceback

log = logging.getLogger("pgstream.checkpoint")


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

    def key(self) -> dict[str, Any]:
        """Parameters naming the partition."""
        return {"job": self.job, "source": self.source, "partition": self.partition}


class DuplicateOutputError(Exception):
    """An append sink already holds an output of this batch (offsets were rewound)."""


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


class HandlerError(PgStreamError):
    """An ``@app.batch`` handler raised."""


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
            row = cur.execute(
                queries.CHECKPOINT,
                {
                    **rng.key(),
                    "end": rng.end,
                    "start": rng.committed,
                    "epoch": rng.epoch,
                    "lease": lease_seconds,
                    "head": rng.head,
                    "records": out.records_in,
                    "plan_version": rng.plan_version,
                },
            ).fetchone()
            if row is None:
                raise LeaseLostError(
                    f"{rng.source}/{rng.partition}: epoch {rng.epoch} or plan version "
                    f"{rng.plan_version} is stale"
                )
            for plan in pipeline.fold_plans:
                overlay = out.folds[plan.index]
                plan.state.write(cur, {k: blob for k, (_, blob) in overlay.items()})
            crash_point("after_state")
            maybe_inject_error(cur)
            written = _write_sinks(cur, pipeline, out, tolerate_duplicates)
            crash_point("after_sinks")
            _run_handlers(cur, pipeline, rng, out)
            if out.dead:
                with cur.copy(queries.COPY_DEAD_LETTERS) as copy:
                    for d in out.dead:
                        copy.write_row(
                            (
                                rng.job,
                                rng.source,
                                rng.partition,
                                d.offset,
                                d.payload,
                                d.error,
                                d.operator,
                            )
                        )
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
        crash_point("before_commit")
    except BaseException:
        _rollback_quietly(conn)
        raise
    try:
        conn.execute("COMMIT")
    except psycopg.OperationalError as exc:
        raise CommitOutcomeUnknown(str(exc)) from exc
    crash_point("after_commit")
    return written


def _write_sinks(
    cur: psycopg.Cursor[Any], pipeline: Pipeline, out: BatchOutput, tolerate_duplicates: bool
) -> int:
    written = 0
    table = ""  # the sink being written, for SinkDataError
    try:
        for plan in pipeline.append_plans:
            table = plan.sink.info.label
            groups = out.append[plan.index]
            if not groups:
                continue
            if tolerate_duplicates:
                for cols, rows in groups.items():
                    plan.sink.insert_ignoring_duplicates(cur, cols, rows)
            else:
                try:
                    plan.sink.write(cur, groups)
                except psycopg.errors.UniqueViolation as exc:
                    raise DuplicateOutputError(str(exc)) from exc
            written += sum(len(rows) for rows in groups.values())
        for agg_plan, key in pipeline.aggregate_plans:
            table = agg_plan.sink.info.label
            rows = agg_plan.rows(out.aggregates[agg_plan.index], key)
            agg_plan.sink.write(cur, agg_plan.sink.value_columns(), rows)
            written += len(rows)
        for fold_plan in pipeline.fold_plans:
            table = fold_plan.sink.info.label
            by_cols: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
            spec_key = fold_plan.sink.key_columns
            for key, blob in out.folds[fold_plan.index].values():
                cols, values = fold_plan.fold.output(blob)
                key_values = key if len(spec_key) > 1 else (key,)
                by_cols.setdefault(cols, []).append((*key_values, *values))
            for cols, rows in by_cols.items():
                fold_plan.sink.write(cur, cols, rows)
                written += len(rows)
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        raise SinkDataError(exc, table) from exc
    return written


def probe_sinks(conn: psycopg.Connection[Any], pipeline: Pipeline, out: BatchOutput) -> (
    SinkDataError | None
):
    """Write ``out``'s sink rows in a transaction that is always rolled back: the sink's
    rejection, or ``None`` when the sinks take them. Nothing is committed, nothing fenced;
    used to tell a bad record from a sink that rejects every record."""
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            try:
                _write_sinks(cur, pipeline, out, tolerate_duplicates=False)
            except SinkDataError as exc:
                return exc
            except DuplicateOutputError:
                return None  # the row is there already: not a rejection
            return None
    finally:
        _rollback_quietly(conn)


def _run_handlers(
    cur: psycopg.Cursor[Any], pipeline: Pipeline, rng: BatchRange, out: BatchOutput
) -> None:
    for plan in pipeline.handler_plans:
        batch = Batch(
            job=rng.job,
            source=rng.source,
            partition=rng.partition,
            start_offset=rng.start,
            end_offset=rng.end,
            records=out.handler_records[plan.index],
            cursor=cur,
        )
        try:
            plan.spec.fn(batch)
        except psycopg.OperationalError:
            raise  # transient (lost connection, serialization failure, deadlock...): retried
        except Exception as exc:
            log.info("@app.batch handler %s failed:\n%s", plan.spec.name, format_traceback(exc))
            raise HandlerError(
                f"@app.batch handler {plan.spec.name} failed on {rng.source}/{rng.partition} "
                f"[{rng.start}, {rng.end}): {describe(exc)}",
                hint="the batch was rolled back; fix the handler and run again",
            ) from exc


def _rollback_quietly(conn: psycopg.Connection[Any]) -> None:
    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute("ROLLBACK")

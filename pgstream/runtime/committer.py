"""Committing one batch exactly once, whatever the connection does meanwhile.

Transient errors (serialization failure, deadlock, lost connection) retry the whole batch
transaction (:mod:`pgstream.runtime.retry`). A COMMIT whose outcome is unknown is never sent
again: the partition row says whether the batch landed (invariant 5 of the design). An append
sink that already holds the batch's outputs (a batch that landed but was not seen to) is
retried with duplicates tolerated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg
from tenacity import RetryCallState

from pgstream.config import Settings
from pgstream.errors import DatabaseError, LeaseLostError
from pgstream.runtime.checkpoint import (
    BatchRange,
    CommitOutcomeUnknown,
    DuplicateOutputError,
    commit_batch,
)
from pgstream.runtime.connection import WorkerConnection
from pgstream.runtime.leases import LeaseManager
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.runtime.retry import RetryBatch, batch_retrying

log = logging.getLogger("pgstream.task")

#: told of each retry: the attempt that failed and its error
RetryFn = Callable[[int, BaseException | None], None]


class BatchCommitter:
    """Writes one partition's batches through :func:`~pgstream.runtime.checkpoint.commit_batch`."""

    def __init__(
        self,
        db: WorkerConnection,
        leases: LeaseManager,
        pipeline: Pipeline,
        settings: Settings,
        on_retry: RetryFn,
    ) -> None:
        self.db = db
        self.leases = leases
        self.pipeline = pipeline
        self.settings = settings
        self.on_retry = on_retry

    def commit(self, out: BatchOutput, rng: BatchRange) -> int:
        """Commit ``out`` as the batch ``rng``; return the output rows written.

        Raises :class:`~pgstream.errors.LeaseLostError` when fenced, a lost connection's
        :class:`psycopg.OperationalError` for the worker loop to reconnect, and
        :class:`~pgstream.errors.DatabaseError` after ``max_retries`` other failures.
        """
        tolerate = False
        written = 0
        try:
            for attempt in batch_retrying(self.settings.max_retries, self._before_retry):
                with attempt:
                    try:
                        written = commit_batch(
                            self.db.conn,
                            self.pipeline,
                            rng,
                            out,
                            lease_seconds=self.settings.lease_seconds,
                            tolerate_duplicates=tolerate,
                        )
                    except CommitOutcomeUnknown:
                        self.db.reset()
                        if not self._landed(rng):
                            raise
                    except DuplicateOutputError:
                        tolerate = True
                        raise RetryBatch(
                            "append sink already holds outputs of this batch"
                        ) from None
                    except psycopg.OperationalError:
                        if self.db.conn.broken or self.db.conn.closed:
                            self.db.reset()
                        raise
        except psycopg.OperationalError as exc:
            if _connection_lost(exc):
                raise  # the worker loop reconnects and retries with a longer backoff
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseError(
                f"{rng.source}/{rng.partition}: batch [{rng.start}, {rng.end}) failed "
                f"{self.settings.max_retries} times in a row and was not committed: "
                f"SQLSTATE {exc.sqlstate}: {first}",
                hint="nothing past the last committed offset was written; fix the cause "
                "(disk space, lock contention, timeouts) and run again to resume there",
            ) from exc
        return written

    def _landed(self, rng: BatchRange) -> bool:
        """After a failed COMMIT: read the partition row to learn whether the batch landed."""
        for attempt in batch_retrying(self.settings.max_retries, self._before_retry):
            with attempt:
                try:
                    committed, epoch = self.leases.read_partition(
                        self.db.conn, rng.source, rng.partition
                    )
                except psycopg.OperationalError:
                    self.db.reset()
                    raise
        if epoch == rng.epoch and committed == rng.end:
            log.warning("COMMIT outcome was unknown; the batch landed (offset %s)", rng.end)
            return True
        if epoch == rng.epoch and committed == rng.committed:
            log.warning("COMMIT outcome was unknown; the batch did not land: retrying")
            return False
        raise LeaseLostError(f"{rng.source}/{rng.partition}: taken over during an unknown commit")

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.on_retry(state.attempt_number, exc)


def _connection_lost(exc: psycopg.OperationalError) -> bool:
    """A lost or refused connection (no SQLSTATE, class 08, server shutting down/starting),
    as opposed to an error the server reported on a live session."""
    code = exc.sqlstate
    return code is None or code.startswith("08") or code in ("57P01", "57P02", "57P03")

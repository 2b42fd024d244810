"""One leased partition: read a batch, evaluate it, commit it exactly once, repeat."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from tenacity import RetryCallState

from pgstream.config import Settings
from pgstream.errors import DatabaseError, LeaseLostError, RecordFailedError
from pgstream.runtime.checkpoint import (
    BatchRange,
    CommitOutcomeUnknown,
    DuplicateOutputError,
    SinkDataError,
    commit_batch,
)
from pgstream.runtime.connection import WorkerConnection
from pgstream.runtime.crashpoints import crash_point
from pgstream.runtime.leases import Lease, LeaseManager
from pgstream.runtime.pipeline import BatchOutput, DeadLetter, Pipeline, payload_of
from pgstream.runtime.retry import RetryBatch, batch_retrying
from pgstream.sources.base import PartitionReader, SourceRecord

log = logging.getLogger("pgstream.task")


@dataclass(slots=True)
class TaskStats:
    """Counters for progress display and status."""

    records: int = 0
    batches: int = 0
    dead_letters: int = 0
    retries: int = 0
    last_commit: float = field(default_factory=time.monotonic)


class PartitionTask:
    """Processes one partition while this worker holds its lease."""

    def __init__(
        self,
        *,
        job: str,
        worker: str,
        lease: Lease,
        initial_offset: int,
        reader: PartitionReader,
        pipeline: Pipeline,
        db: WorkerConnection,
        leases: LeaseManager,
        settings: Settings,
        on_commit: Callable[[PartitionTask, int], None] | None = None,
    ) -> None:
        self.job = job
        self.worker = worker
        self.lease = lease
        self.reader = reader
        self.pipeline = pipeline
        self.db = db
        self.leases = leases
        self.settings = settings
        self.on_commit = on_commit
        self.committed: int | None = lease.committed_offset
        self.position: int = (
            initial_offset if lease.committed_offset is None else lease.committed_offset
        )
        self.head: int | None = None
        self.stats = TaskStats()

    @property
    def source(self) -> str:
        return self.lease.source

    @property
    def partition(self) -> str:
        return self.lease.partition

    # -- the loop body -----------------------------------------------------------------------

    def poll(self) -> int:
        """Commit the next batch if the source has one; return the records it held."""
        records, end, head = self._read()
        self.head = head
        if end == self.position:
            return 0
        crash_point("after_read")
        attempts = self.leases.bump_attempts(self.db.conn, self.lease)
        if attempts is None:
            raise LeaseLostError(f"{self.source}/{self.partition}: lease lost")
        limit = self.settings.max_record_attempts
        if attempts > 2 * limit and records:
            # The first record has killed the worker again and again: set it aside.
            self._commit_dead(
                records[0],
                self.position,
                _next_offset(records, 0, end),
                f"the worker died {attempts - 1} times in a row while processing this record",
                "worker",
            )
            return 1
        if attempts > limit and len(records) > 1:
            # Something in this batch kills the worker: go through it one record per batch,
            # so the records before the culprit commit and it comes first in the next batch
            # (where it is set aside after ``limit`` more deaths). Shrinking to the first
            # record only would cost ``limit`` deaths per record before the culprit.
            log.warning(
                "%s/%s: the worker died %d times on the batch at offset %s: "
                "committing it one record at a time",
                self.source, self.partition, attempts - 1, self.position,
            )
            for i in range(len(records)):
                self._run(records[i : i + 1], self.position, _next_offset(records, i, end))
            return len(records)
        self._run(records, self.position, end)
        return max(1, len(records))

    def _read(self) -> tuple[list[SourceRecord], int, int | None]:
        size = self.settings.batch_size
        deadline = time.monotonic() + self.settings.max_interval
        res = self.reader.read(self.position, size)
        records, end, head = res.records, res.end, res.head
        while len(records) < size and end > self.position and time.monotonic() < deadline:
            more = self.reader.read(end, size - len(records))
            if more.end == end:
                break
            records.extend(more.records)
            end, head = more.end, more.head
        return records, end, head

    # -- exactly-once commit -------------------------------------------------------------------

    def _run(self, records: list[SourceRecord], start: int, end: int) -> None:
        out = self.pipeline.evaluate(records)
        try:
            self._commit(out, start, end)
        except SinkDataError as exc:
            if len(records) <= 1:
                if not records:
                    raise
                self._commit_dead(records[0], start, end, f"sink rejected: {exc}", "sink")
                return
            mid = len(records) // 2
            split = records[mid].offset
            log.info("sink rejected a row in [%s, %s): bisecting at %s", start, end, split)
            self._run(records[:mid], start, split)
            self._run(records[mid:], split, end)

    def _commit_dead(
        self, record: SourceRecord, start: int, end: int, error: str, operator: str
    ) -> None:
        if self.settings.on_error == "fail":
            raise RecordFailedError(
                f"record at offset {record.offset} of {self.source}/{self.partition}: {error}"
            )
        out = self.pipeline.evaluate([])
        out.records_in = 1
        out.dead.append(DeadLetter(record.offset, payload_of(record), error, operator))
        self._commit(out, start, end)

    def _commit(self, out: BatchOutput, start: int, end: int) -> None:
        rng = BatchRange(
            job=self.job,
            source=self.source,
            partition=self.partition,
            epoch=self.lease.epoch,
            worker=self.worker,
            committed=self.committed,
            start=start,
            end=end,
            head=self.head,
        )
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
                f"{self.source}/{self.partition}: batch [{start}, {end}) failed "
                f"{self.settings.max_retries} times in a row and was not committed: "
                f"SQLSTATE {exc.sqlstate}: {first}",
                hint="nothing past the last committed offset was written; fix the cause "
                "(disk space, lock contention, timeouts) and run again to resume there",
            ) from exc
        self._committed(out, end, written)

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

    def _committed(self, out: BatchOutput, end: int, written: int) -> None:
        for plan in self.pipeline.fold_plans:
            plan.state.merge({k: blob for k, (_, blob) in out.folds[plan.index].items()})
        self.committed = end
        self.position = end
        self.stats.records += out.records_in
        self.stats.batches += 1
        self.stats.dead_letters += len(out.dead)
        self.stats.last_commit = time.monotonic()
        if self.on_commit is not None:
            self.on_commit(self, out.records_in)

    def _before_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s/%s: transient error (attempt %d), retrying: %s",
            self.source,
            self.partition,
            state.attempt_number,
            str(exc).strip().splitlines()[0] if exc else "?",
        )

    def close(self) -> None:
        """Release the reader."""
        self.reader.close()


def _connection_lost(exc: psycopg.OperationalError) -> bool:
    """A lost or refused connection (no SQLSTATE, class 08, server shutting down/starting),
    as opposed to an error the server reported on a live session."""
    code = exc.sqlstate
    return code is None or code.startswith("08") or code in ("57P01", "57P02", "57P03")


def _next_offset(records: list[SourceRecord], index: int, end: int) -> int:
    """The exclusive end of ``records[index]``: the next record's offset, or ``end``."""
    return records[index + 1].offset if index + 1 < len(records) else end

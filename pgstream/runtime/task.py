"""One leased partition: read a batch, evaluate it, commit it exactly once, repeat.

:class:`PartitionTask` is the loop that composes the parts, each in its own module:
batch sizes (:mod:`~pgstream.runtime.batching`), reading and evaluating
(:mod:`~pgstream.runtime.reading`), read-ahead (:mod:`~pgstream.runtime.readahead`), records
that kill the worker (:mod:`~pgstream.runtime.poison`), the exactly-once commit
(:mod:`~pgstream.runtime.committer`) and sink rejections (:mod:`~pgstream.runtime.bisection`).
What happens is told to a :class:`~pgstream.runtime.observers.WorkerObserver`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pgstream.config import Settings
from pgstream.errors import LeaseLostError, RecordFailedError
from pgstream.runtime.batching import BatchSizer, InputBatch
from pgstream.runtime.bisection import SinkRejections
from pgstream.runtime.checkpoint import BatchRange, SinkDataError
from pgstream.runtime.committer import BatchCommitter
from pgstream.runtime.connection import WorkerConnection
from pgstream.runtime.crashpoints import crash_point
from pgstream.runtime.leases import Lease, LeaseManager
from pgstream.runtime.observers import WorkerObserver
from pgstream.runtime.outage import SourceOutage
from pgstream.runtime.pipeline import BatchOutput, DeadLetter, Pipeline, payload_of
from pgstream.runtime.poison import PoisonGuard
from pgstream.runtime.pushdown import SQL_BATCH, PushdownFallback
from pgstream.runtime.readahead import ReadAhead
from pgstream.runtime.reading import BatchReader
from pgstream.sources.base import PartitionReader, SourceError, SourceRecord, SourceUnreachable

log = logging.getLogger("pgstream.task")


@dataclass(slots=True)
class TaskStats:
    """Counters for progress display and status."""

    records: int = 0
    batches: int = 0
    dead_letters: int = 0
    retries: int = 0


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
        plan_version: int,
        observer: WorkerObserver | None = None,
        reopen: Callable[[], PartitionReader] | None = None,
    ) -> None:
        self.job = job
        self.plan_version = plan_version
        self.worker = worker
        self.lease = lease
        self.pipeline = pipeline
        self.db = db
        self.leases = leases
        self.settings = settings
        self.observer = observer or WorkerObserver()
        self.committed: int | None = lease.committed_offset
        self.position: int = (
            initial_offset if lease.committed_offset is None else lease.committed_offset
        )
        self.head: int | None = None
        self.stats = TaskStats()
        where = f"{self.source}/{self.partition}"
        self.sizer = BatchSizer(settings, per_record_output=pipeline.per_record_output)
        if pipeline.sql_only:  # batches hold no rows: let them be big from the start
            self.sizer.cap = self.sizer.limit = settings.batch_size or SQL_BATCH
        self.input = BatchReader(reader, pipeline, self.sizer, settings, where)
        self.ahead = ReadAhead(where)
        #: opens a new reader after the source's server went away (None: keep this one)
        self.reopen = reopen
        self.outage = SourceOutage(settings.max_retries, where)
        self._reopen_next = False
        self._instance: str | None = lease.source_instance  # as committed
        self._instance_checked = False  # for the current reader
        self.committer = BatchCommitter(db, leases, pipeline, settings, self._before_retry)
        self.rejections = SinkRejections(
            pipeline, db, settings, where, self._commit, self._set_aside
        )
        self.poison = PoisonGuard(
            settings.max_record_attempts, where, self.rejections.run, self._set_aside
        )

    @property
    def source(self) -> str:
        return self.lease.source

    @property
    def partition(self) -> str:
        return self.lease.partition

    @property
    def reader(self) -> PartitionReader:
        """The partition's reader."""
        return self.input.reader

    def poll(self) -> int:
        """Commit the next batch if the source has one; return the records it held.

        While a batch commits (the database's work), the next one is read and evaluated on a
        helper thread (Python's work), so the two overlap. The helper never touches the
        checkpoint connection; it is used only if the batch before it committed as evaluated.

        A source whose server cannot be reached (:class:`SourceUnreachable`) is retried with
        back-off through a new reader (:mod:`pgstream.runtime.outage`); meanwhile this returns
        0 and nothing is committed.
        """
        if self.outage.waiting():
            return 0
        try:
            if self._reopen_next and self.reopen is not None:
                self._reopen_next = False
                self.input.reader = self.reopen()
                self._instance_checked = False
            done = self._poll()
        except SourceUnreachable as exc:
            self._unreachable(exc)
            return 0
        self.outage.recovered()
        return done

    def _check_instance(self) -> None:
        """Refuse a recreated stream: the reader's instance differs from the one the
        committed offsets belong to (on_lost does not apply: the offsets mean other records)."""
        found = self.reader.instance()
        self._instance_checked = True
        if found is None or self._instance is None or found == self._instance:
            self._instance = found or self._instance
            return
        if self.committed is None:
            self._instance = found
            return
        raise SourceError(
            f"{self.source}/{self.partition}: the stream was recreated: it is now {found}, the "
            f"job's committed offset {self.committed} belongs to {self._instance}; fix: if the "
            f"new stream is meant, start it over with pgstream job reset MODULE:APP --stream "
            f"{self.source} --yes (on_lost does not apply)"
        )

    def _unreachable(self, exc: SourceUnreachable) -> None:
        """The source went away: drop the read-ahead and the reader, back off (or give up)."""
        self.ahead.cancel()
        with contextlib.suppress(Exception):  # best effort: the server is gone
            self.leases.forgive_attempt(self.db.conn, self.lease)
        self.outage.failed(exc)
        if self.reopen is not None:
            with contextlib.suppress(Exception):
                self.input.reader.close()
            self._reopen_next = True

    def _poll(self) -> int:
        batch, out = self._next()
        self.head = batch.head
        if batch.end == self.position:
            return 0
        crash_point("after_read")
        attempts = self.leases.bump_attempts(self.db.conn, self.lease)
        if attempts is None:
            raise LeaseLostError(f"{self.source}/{self.partition}: lease lost")
        start, end = self.position, batch.end
        if self.poison.suspect(attempts):
            records = self.input.records(batch)
            handled = self.poison.handle(attempts, records, start, end, lambda: self.position)
            if handled is not None:
                return handled
        if out is None:
            out = self.input.fill(batch, None)
            end, self.head = batch.end, batch.head
        self.sizer.grow(batch)
        self.ahead.start(end, functools.partial(self.input.prepare, end, out))
        try:
            self._commit(out, start, end)
        except SinkDataError as exc:
            self.ahead.cancel()
            records = self.input.records(batch)
            if out.pushed:
                # SQL computed the rows (an expression may have failed, e.g. a division by
                # zero): evaluate them in Python, where an operator error is a dead letter
                # like in any Python batch, and bisect only what the sink still rejects
                self.rejections.run(records, start, end)
            else:
                self.rejections.rejected(records, start, end, exc, records)
        except PushdownFallback:
            self.ahead.cancel()
            self.rejections.run(self.input.records(batch), start, end)
        else:
            self.sizer.settle(len(batch), time.monotonic() - batch.read_at)
        return max(1, out.records_in)

    def _next(self) -> tuple[InputBatch, BatchOutput | None]:
        """The read-ahead batch and its output if there is one, else the first chunk of a
        batch read now (evaluated by ``fill`` once its attempt is counted)."""
        ahead = self.ahead.take(self.position)
        if ahead is not None and ahead.batch.end > ahead.batch.start:
            return ahead.batch, ahead.out
        return self.input.first_chunk(self.position), None

    def _set_aside(
        self, record: SourceRecord, start: int, end: int, error: str, operator: str
    ) -> None:
        """Commit ``[start, end)`` with ``record`` as a dead letter (or fail, if so set)."""
        if self.settings.on_error == "fail":
            raise RecordFailedError(
                f"record at offset {record.offset} of {self.source}/{self.partition}: {error}"
            )
        out = self.pipeline.evaluate([])
        out.records_in = 1
        out.dead.append(DeadLetter(record.offset, payload_of(record), error, operator))
        self._commit(out, start, end)

    def _commit(self, out: BatchOutput, start: int, end: int) -> None:
        if not self._instance_checked:  # once per reader, before its first commit
            self._check_instance()
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
            plan_version=self.plan_version,
            skips=tuple(self.reader.skips(start, end)),
            instance=self._instance,
        )
        began = time.monotonic()
        self.committer.commit(out, rng)
        self._committed(out, end, time.monotonic() - began)
        self._skipped(rng)

    def _skipped(self, rng: BatchRange) -> None:
        """After the commit: warn of the ranges the source's reset policy skipped."""
        self.reader.forget_skips(rng.end)
        for skip in rng.skips:
            log.warning(
                "%s/%s: offsets [%d, %d) are gone from the source (%s: %s); skipped by "
                "on_lost=%r and recorded in pgstream.skipped_ranges",
                self.source, self.partition, skip.start, skip.end, skip.reason, skip.detail,
                skip.policy,
            )

    def _committed(self, out: BatchOutput, end: int, seconds: float) -> None:
        self.pipeline.committed(out)
        self.committed = end
        if out.records_in > len(out.dead):
            self.rejections.taken()
        self.position = end
        self.stats.records += out.records_in
        self.stats.batches += 1
        self.stats.dead_letters += len(out.dead)
        self.observer.batch_committed(self, out, seconds)
        if out.dead:
            self.observer.dead_lettered(self, out.dead)
        self.observer.committed(self, out.records_in)

    def _before_retry(self, attempt: int, error: BaseException | None) -> None:
        self.stats.retries += 1
        log.warning(
            "%s/%s: transient error (attempt %d), retrying: %s",
            self.source,
            self.partition,
            attempt,
            str(error).strip().splitlines()[0] if error else "?",
            extra={"stream": self.source, "partition": self.partition},
        )
        self.observer.retried(self, attempt, error)

    def close(self) -> None:
        """Stop the read-ahead and release the reader."""
        self.ahead.close()
        self.input.close()

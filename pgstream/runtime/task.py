"""One leased partition: read a batch, evaluate it, commit it exactly once, repeat."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
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
    probe_sinks,
)
from pgstream.runtime.connection import WorkerConnection
from pgstream.runtime.crashpoints import crash_point
from pgstream.runtime.leases import Lease, LeaseManager
from pgstream.runtime.pipeline import BatchOutput, DeadLetter, Pipeline, payload_of
from pgstream.runtime.rejections import Reason, rejects_everything
from pgstream.runtime.retry import RetryBatch, batch_retrying
from pgstream.sources.base import PartitionReader, SourceError, SourceRecord
from pgstream.sources.raw import RawBatch, RawReader

log = logging.getLogger("pgstream.task")

#: records in the first batch after a task starts; batches then adapt (``_grow``, ``_settle``)
FIRST_BATCH = 5_000
#: most records read (and held undecoded or decoded) at once; a batch is one or more chunks
CHUNK = 50_000
#: the most records per batch unless ``Settings.batch_size`` says otherwise: for pipelines
#: whose output grows with the records (append sinks, batch handlers), and for the others
#: (aggregates, folds), whose output grows with the keys touched
DEFAULT_BATCH = 100_000
KEYED_BATCH = 400_000


@dataclass(slots=True)
class InputBatch:
    """One read of a partition, covering the offsets ``[start, end)``: decoded records, or
    undecoded payloads (``lines``) that the pipeline decodes while it evaluates them.

    Once evaluated, the input is released (:meth:`release`): only rare paths need it again
    and they read it again from the source, which is replayable by offset.
    """

    start: int
    end: int
    head: int | None
    records: list[SourceRecord] | None = None
    lines: RawBatch | None = None
    read_at: float = field(default_factory=time.monotonic)
    released: int | None = None  # the number of records, once the input is released
    limit: int = 0  # the most records it was read to hold
    evaluated_in: float = 0.0  # seconds to read and evaluate it

    def __len__(self) -> int:
        if self.released is not None:
            return self.released
        return len(self.lines) if self.lines is not None else len(self.records or ())

    def release(self) -> None:
        """Drop the input (keeping its size)."""
        self.released = len(self)
        self.records = self.lines = None

    def decoded(self) -> list[SourceRecord]:
        """The batch as records (decoding the lines on first use)."""
        if self.records is None:
            self.records = self.lines.records() if self.lines is not None else []
        return self.records

    def extend(self, more: InputBatch) -> None:
        """Add the (evaluated, released) read that continued where this one ended."""
        assert self.released is not None and more.released is not None
        self.released += more.released
        self.end, self.head = more.end, more.head


@dataclass(slots=True)
class _Ahead:
    """The next batch, read and evaluated while the current one commits."""

    batch: InputBatch
    out: BatchOutput | None


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
        plan_version: int,
        on_commit: Callable[[PartitionTask, int], None] | None = None,
    ) -> None:
        self.job = job
        self.plan_version = plan_version
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
        self._cap = settings.batch_size or (
            DEFAULT_BATCH if pipeline.per_record_output else KEYED_BATCH
        )
        self._limit = min(self._cap, FIRST_BATCH)
        self._last_latency = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[_Ahead]] | None = None  # (its start, its result)
        #: the reason shared by the last records the sink rejected alone at the end of their
        #: batches, and how many in a row (see :meth:`_count_lone_rejection`)
        self._lone: tuple[Reason, int] | None = None

    @property
    def source(self) -> str:
        return self.lease.source

    @property
    def partition(self) -> str:
        return self.lease.partition

    # -- the loop body -----------------------------------------------------------------------

    def poll(self) -> int:
        """Commit the next batch if the source has one; return the records it held.

        While a batch commits (the database's work), the next one is read and evaluated on a
        helper thread (Python's work), so the two overlap. The helper never touches the
        checkpoint connection; it is used only if the batch before it committed as evaluated.
        """
        batch, out = self._next()
        self.head = batch.head
        if batch.end == self.position:
            return 0
        crash_point("after_read")
        attempts = self.leases.bump_attempts(self.db.conn, self.lease)
        if attempts is None:
            raise LeaseLostError(f"{self.source}/{self.partition}: lease lost")
        start, end = self.position, batch.end
        limit = self.settings.max_record_attempts
        if attempts > limit:
            records = self._records(batch)
            if attempts > 2 * limit and records:
                # The first record has killed the worker again and again: set it aside.
                self._commit_dead(
                    records[0],
                    start,
                    _next_offset(records, 0, end),
                    f"the worker died {attempts - 1} times in a row while processing this record",
                    "worker",
                )
                return 1
            if len(records) > 1:
                # Something in this batch kills the worker: go through it one record per
                # batch, so the records before the culprit commit and it comes first in the
                # next batch (where it is set aside after ``limit`` more deaths). Shrinking to
                # the first record only would cost ``limit`` deaths per record before the
                # culprit.
                log.warning(
                    "%s/%s: the worker died %d times on the batch at offset %s: "
                    "committing it one record at a time",
                    self.source,
                    self.partition,
                    attempts - 1,
                    start,
                )
                for i in range(len(records)):
                    self._run(records[i : i + 1], self.position, _next_offset(records, i, end))
                return len(records)
        if out is None:
            out = self._fill(batch, None)
            end, self.head = batch.end, batch.head
        self._grow(batch)
        self._read_ahead(end, out)
        try:
            self._commit(out, start, end)
        except SinkDataError as exc:
            self._cancel_ahead()
            records = self._records(batch)
            self._rejected(records, start, end, exc, records)
        else:
            self._settle(len(batch), time.monotonic() - batch.read_at)
        return max(1, out.records_in)

    # -- reading and read-ahead -------------------------------------------------------------------

    def _next(self) -> tuple[InputBatch, BatchOutput | None]:
        """The read-ahead batch and its output if there is one, else the first chunk of a
        batch read now (evaluated by :meth:`_fill` once its attempt is counted)."""
        ahead = self._take_ahead()
        if ahead is not None and ahead.batch.end > ahead.batch.start:
            return ahead.batch, ahead.out
        return self._read_once(self.position, min(self._limit, CHUNK)), None

    def _fill(self, batch: InputBatch, pending: BatchOutput | None) -> BatchOutput:
        """Evaluate ``batch`` (a first chunk), then read and evaluate more chunks into the same
        output until the batch holds ``_limit`` records, the source has nothing more, or
        ``max_interval`` has passed. Chunks are released once evaluated, so a batch that only
        aggregates or folds costs the memory of one chunk however big it grows."""
        batch.limit = limit = self._limit
        out = self._evaluate(batch, pending, None)
        deadline = batch.read_at + self.settings.max_interval
        while len(batch) < limit and time.monotonic() < deadline:
            more = self._read_once(batch.end, min(limit - len(batch), CHUNK))
            if more.end == batch.end:
                break
            self._evaluate(more, pending, out)
            batch.extend(more)
        batch.evaluated_in = time.monotonic() - batch.read_at
        return out

    def _read_once(self, start: int, size: int) -> InputBatch:
        if isinstance(self.reader, RawReader):
            raw = self.reader.read_raw(start, size)
            return InputBatch(start, raw.end, raw.head, lines=raw)
        res = self.reader.read(start, size)
        return InputBatch(start, res.end, res.head, records=res.records)

    def _evaluate(
        self, batch: InputBatch, pending: BatchOutput | None, into: BatchOutput | None
    ) -> BatchOutput:
        if batch.lines is not None:
            out = self.pipeline.evaluate_raw(batch.lines, pending, into)
        else:
            out = self.pipeline.evaluate(batch.decoded(), pending, into)
        batch.release()
        return out

    def _records(self, batch: InputBatch) -> list[SourceRecord]:
        """The batch's records, read again from the source if they were released."""
        if batch.released is None:
            return batch.decoded()
        records: list[SourceRecord] = []
        pos = batch.start
        while pos < batch.end:
            more = self._read_once(pos, max(1, len(batch) - len(records)))
            if more.end <= pos:
                raise SourceError(
                    f"{self.source}/{self.partition}: offsets [{pos}, {batch.end}) could not be "
                    "read again"
                )
            records += [r for r in more.decoded() if r.offset < batch.end]
            pos = more.end
        return records

    def _prepare(self, start: int, pending: BatchOutput) -> _Ahead:
        """Read and evaluate the batch at ``start`` (on the read-ahead thread)."""
        batch = self._read_once(start, min(self._limit, CHUNK))
        out = self._fill(batch, pending) if batch.end > start else None
        return _Ahead(batch, out)

    def _read_ahead(self, start: int, pending: BatchOutput) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix=f"pgstream-read-ahead-{self.source}/{self.partition}"
            )
        self._ahead = (start, self._executor.submit(self._prepare, start, pending))

    def _take_ahead(self) -> _Ahead | None:
        """The read-ahead result if it starts at ``position`` (its read or evaluation error is
        raised here); a read-ahead from elsewhere (its batch did not commit) is dropped."""
        if self._ahead is None:
            return None
        if self._ahead[0] != self.position:
            self._cancel_ahead()
            return None
        future, self._ahead = self._ahead[1], None
        return future.result()

    def _cancel_ahead(self) -> None:
        """Drop the read-ahead and its errors, waiting for it so the reader is free again."""
        if self._ahead is None:
            return
        future, self._ahead = self._ahead[1], None
        if not future.cancel():
            wait_for([future])

    def _grow(self, batch: InputBatch) -> None:
        """Before reading ahead: after a full batch that took well under ``target_latency`` to
        read and evaluate (fourfold below an eighth of it, twofold below a quarter), the next
        batches may hold more, unless the last COMMIT came over half of it after its read."""
        target = self.settings.target_latency
        if len(batch) < batch.limit or self._last_latency > target / 2:
            return
        if batch.evaluated_in < target / 8:
            factor = 4
        elif batch.evaluated_in < target / 4:
            factor = 2
        else:
            return
        self._limit = min(self._cap, max(self._limit, batch.limit * factor))

    def _settle(self, size: int, latency: float) -> None:
        """After a COMMIT ``latency`` seconds after its batch was read: over
        ``target_latency`` halves the next batches."""
        self._last_latency = latency
        if latency > self.settings.target_latency:
            self._limit = max(1, min(self._limit, size) // 2)

    # -- exactly-once commit -------------------------------------------------------------------

    def _run(
        self,
        records: list[SourceRecord],
        start: int,
        end: int,
        rest: list[SourceRecord] | None = None,
    ) -> None:
        """Evaluate and commit ``records`` as one batch; ``rest`` is them and the records
        after them in the batch being bisected (for :meth:`_rejected`)."""
        out = self.pipeline.evaluate(records)
        try:
            self._commit(out, start, end)
        except SinkDataError as exc:
            self._rejected(records, start, end, exc, records if rest is None else rest)

    def _rejected(
        self,
        records: list[SourceRecord],
        start: int,
        end: int,
        exc: SinkDataError,
        rest: list[SourceRecord],
    ) -> None:
        """The sink rejected a row of ``records``: stop if it rejects every record, else
        bisect down to the bad record and set it aside. ``rest`` starts with ``records`` and
        goes on to the end of the batch read (what :meth:`_stop_if_everything_rejected` tries).
        """
        if not records:
            raise exc
        self._stop_if_everything_rejected(rest, start)
        if len(records) == 1:
            if len(rest) == 1:
                self._count_lone_rejection(exc, start)
            self._commit_dead(records[0], start, end, f"sink rejected: {exc}", "sink")
            return
        mid = len(records) // 2
        split = records[mid].offset
        log.info("sink rejected a row in [%s, %s): bisecting at %s", start, end, split)
        self._run(records[:mid], start, split, rest)
        self._run(records[mid:], split, end, rest[mid:])

    def _stop_if_everything_rejected(self, rest: list[SourceRecord], start: int) -> None:
        """Raise :class:`~pgstream.errors.SinkRejectedError` when each of the first
        ``max_sink_rejections`` records of ``rest`` (at least two; all when fewer are left),
        written alone and rolled back, is rejected for the same reason (see
        :mod:`pgstream.runtime.rejections`). ``start`` is the first one's offset.
        """
        probe = rest[: self.settings.max_sink_rejections]
        if len(probe) < 2:
            return
        first: SinkDataError | None = None
        for rec in probe:
            rejection = probe_sinks(self.db.conn, self.pipeline, self.pipeline.evaluate([rec]))
            if rejection is None:
                return  # a record the sink takes: bisect
            if first is None:
                first = rejection
            elif Reason.of(rejection) != Reason.of(first):
                return  # bad records, each bad its own way: bisect
        assert first is not None
        raise rejects_everything(first, len(probe), f"{self.source}/{self.partition}", start)

    def _count_lone_rejection(self, exc: SinkDataError, start: int) -> None:
        """A batch's last record, rejected alone, cannot be compared with the records after
        it (batches of one record on a quiet stream): stop at the ``max_sink_rejections``-th
        such rejection in a row for one reason with no record taken in between (the earlier
        ones are dead letters by then)."""
        reason = Reason.of(exc)
        count = self._lone[1] + 1 if self._lone is not None and self._lone[0] == reason else 1
        self._lone = (reason, count)
        limit = self.settings.max_sink_rejections
        if limit and count >= limit:
            self._lone = None
            where = f"{self.source}/{self.partition}"
            raise rejects_everything(exc, count, where, start, dead_lettered=count - 1)

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
            plan_version=self.plan_version,
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
        if out.records_in > len(out.dead):
            self._lone = None  # a record was taken
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
        """Stop the read-ahead and release the reader."""
        self._cancel_ahead()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.reader.close()


def _connection_lost(exc: psycopg.OperationalError) -> bool:
    """A lost or refused connection (no SQLSTATE, class 08, server shutting down/starting),
    as opposed to an error the server reported on a live session."""
    code = exc.sqlstate
    return code is None or code.startswith("08") or code in ("57P01", "57P02", "57P03")


def _next_offset(records: list[SourceRecord], index: int, end: int) -> int:
    """The exclusive end of ``records[index]``: the next record's offset, or ``end``."""
    return records[index + 1].offset if index + 1 < len(records) else end

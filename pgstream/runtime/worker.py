"""The worker loop: lease partitions, poll them, commit batches, stop cleanly."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgstream.api import App
from pgstream.config import Settings
from pgstream.db.migrate import ensure_migrated
from pgstream.db.privileges import check_privileges
from pgstream.errors import DatabaseError, LeaseLostError, SourceUnavailableError
from pgstream.operators.lookup import lookups_in
from pgstream.runtime import repartition
from pgstream.runtime.checkpoint import CommitOutcomeUnknown
from pgstream.runtime.connection import WorkerConnection
from pgstream.runtime.group import GroupWatcher
from pgstream.runtime.jobcheck import PlanChangedError, check_job, job_version
from pgstream.runtime.leases import Lease, LeaseManager
from pgstream.runtime.observers import CommitCallback, Observers, WorkerObserver
from pgstream.runtime.outage import UnreachableReader
from pgstream.runtime.pipeline import Pipeline, new_states
from pgstream.runtime.progress import Progress, ProgressReporter, total_lag
from pgstream.runtime.stopping import cancel_on_exit_now, stop_on_signal
from pgstream.runtime.task import PartitionTask
from pgstream.sinks.append import AppendSink
from pgstream.sinks.upsert import AggregateSink, UpsertSink
from pgstream.sources.base import OpenContext, PartitionReader, SourceError, SourceUnreachable

log = logging.getLogger("pgstream.worker")

ProgressFn = Callable[[PartitionTask, int], None]
#: wraps a partition's reader as it is opened: ``(stream, partition, reader) -> reader``
ReaderWrap = Callable[[str, str, PartitionReader], PartitionReader]

#: how often a running worker looks for partitions that appeared (new files, topic partitions)
DISCOVERY_SECONDS = 2.0
#: an idle worker checks this often whether it should stop or the group changed
IDLE_SLICE = 0.05


@dataclass(slots=True)
class RunSummary:
    """What one worker did before it stopped."""

    records: int = 0
    batches: int = 0
    dead_letters: int = 0
    retries: int = 0


def build_sinks(app: App) -> dict[str, AppendSink | UpsertSink]:
    """One sink object per target table of ``app``."""
    sinks: dict[str, AppendSink | UpsertSink] = {}
    for i, spec in enumerate(app.sinks):
        if spec.table in sinks:
            continue
        stage = f"pgstream_stage_{i}"
        if spec.kind == "append":
            sinks[spec.table] = AppendSink(spec.table)
        elif spec.kind == "aggregate":
            assert spec.key is not None
            sinks[spec.table] = AggregateSink(spec.table, spec.key.columns, spec.aggregates, stage)
        else:
            assert spec.key is not None
            sinks[spec.table] = UpsertSink(spec.table, spec.key.columns, stage)
    return sinks


def prepare(app: App, conn: psycopg.Connection[Any]) -> dict[str, AppendSink | UpsertSink]:
    """Check grants, the schema, the sources and the sink tables; raise one clear error if
    not ready."""
    check_privileges(app, conn)
    ensure_migrated(conn)
    for name, source in app.sources.items():
        try:
            source.validate(conn)
        except SourceError as exc:
            raise SourceUnavailableError(f"stream {name!r}: {exc}") from exc
    chains = [s.steps for s in app.sinks] + [h.steps for h in app.handlers]
    for steps in chains:
        for lookup in lookups_in(steps):
            lookup.validate(conn)
    sinks = build_sinks(app)
    for sink in sinks.values():
        sink.bind(conn)
    return sinks


class Worker:
    """Runs an app's partitions that this process can lease, until stopped.

    What happens is told to ``observers`` (:class:`~pgstream.runtime.observers.WorkerObserver`);
    ``on_commit(task, records)`` and ``progress`` are observers too.
    """

    def __init__(
        self,
        app: App,
        dsn: str,
        *,
        settings: Settings | None = None,
        stop_when_idle: bool = False,
        on_commit: ProgressFn | None = None,
        install_signal_handlers: bool = True,
        stop_event: threading.Event | None = None,
        accept_changes: bool = False,
        target: str = "MODULE:APP",
        progress: ProgressReporter | None = None,
        observers: Sequence[WorkerObserver] = (),
        wrap_reader: ReaderWrap | None = None,
    ) -> None:
        self.app = app
        #: wraps every reader this worker opens (``pgstream rebuild`` bounds its reads)
        self.wrap_reader = wrap_reader
        self.accept_changes = accept_changes
        self.target = target
        self.plan_version: int | None = None
        self.dsn = dsn
        self.settings = settings or app.settings
        self.stop_when_idle = stop_when_idle
        self.install_signal_handlers = install_signal_handlers
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.db = WorkerConnection(dsn, f"pgstream:{app.name}:{os.getpid()}")
        self.leases = LeaseManager(
            app.name, self.worker_id, self.settings.lease_seconds, streams=app.sources
        )
        self.tasks: dict[tuple[str, str], PartitionTask] = {}
        self.summary = RunSummary()
        self._stop = stop_event or threading.Event()
        self._sinks: dict[str, AppendSink | UpsertSink] = {}
        self._generation = 0
        self._next_maintenance = 0.0
        self._next_discovery = 0.0
        self._prepared = False
        #: told of every event of the run: ``observers``, then ``on_commit``, then ``progress``
        self.observer = Observers(
            [
                *observers,
                *([CommitCallback(on_commit)] if on_commit is not None else []),
                *([progress] if progress is not None else []),
            ]
        )
        self.partitions = 0  # partitions of the app's streams, as registered at start-up
        #: wakes the loop when another worker joins, hands over or leaves (started with the run)
        self.group: GroupWatcher | None = None
        self._share = 0  # this worker's fair share at the last maintenance
        self._announced = False  # told the group it joined

    def stop(self) -> None:
        """Ask the loop to stop after the batch in flight."""
        self._stop.set()

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Run until stopped (signal, :meth:`stop`, or idle with ``stop_when_idle``)."""
        previous = self._install_signals() if self.install_signal_handlers else {}
        try:
            with cancel_on_exit_now(self.db.cancel):
                self.group = GroupWatcher(
                    self.dsn, self.leases.params(), f"pgstream-group:{self.app.name}:{os.getpid()}"
                ).connect()  # its connection is made while the start-up checks run
                self._start_up()
                self.group.start()  # listening before this worker's first heartbeat tells the group
                self._loop()
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.observer.stopped(self.summary)
        return self.summary

    def _start_up(self) -> None:
        """Validate the app, check its identity and plan (:mod:`pgstream.runtime.jobcheck`)
        and register its partitions; a lost session is retried."""
        attempt = 0
        while not self._stop.is_set():
            try:
                conn = self.db.conn
                self._sinks = prepare(self.app, conn)
                self._prepared = True
                job = check_job(
                    conn,
                    self.app,
                    self._register,
                    accept_changes=self.accept_changes,
                    target=self.target,
                )
                self.plan_version = job.version
                self._warn_orphans(conn)
                self.observer.started(self.app.name, len(self.app.sources), self.partitions)
                return
            except psycopg.OperationalError as exc:
                attempt += 1
                self._back_off(attempt, exc, "during start-up")

    def _warn_orphans(self, conn: psycopg.Connection[Any]) -> None:
        """Name the streams whose checkpoint rows stay behind after they left the code."""
        for name in self.leases.orphan_streams(conn):
            log.warning(
                "job %r has checkpoint rows for stream %r, which is no longer in the app: "
                "it is not read; drop them with: pgstream job retire MODULE:APP --stream %s --yes "
                "(or rename them if the stream was renamed: pgstream job rename MODULE:APP "
                "--stream %s=NEW)",
                self.app.name,
                name,
                name,
                name,
            )

    def _register(self, conn: psycopg.Connection[Any]) -> None:
        self.partitions = 0
        for name, source in self.app.sources.items():
            try:
                partitions = list(source.partitions(conn))
            except SourceError as exc:
                raise SourceUnavailableError(f"stream {name!r}: {exc}") from exc
            self.leases.register(conn, name, partitions)
            self.partitions += len(partitions)
        self._next_discovery = time.monotonic() + DISCOVERY_SECONDS

    def _discover(self, conn: psycopg.Connection[Any], *, force: bool = False) -> None:
        """Register partitions that appeared since the last look (a new file, a new topic
        partition); they are then claimed like any other. At most every
        ``DISCOVERY_SECONDS`` unless ``force``."""
        if force or time.monotonic() >= self._next_discovery:
            self._register(conn)

    def _check_plan_version(self, conn: psycopg.Connection[Any]) -> None:
        """Stop if another worker accepted a newer plan of the job (this one is fenced)."""
        current = job_version(conn, self.app.name)
        if current == self.plan_version:
            return
        now = (
            f"now runs plan version {current}, accepted by another worker"
            if current is not None
            else "has no recorded plan any more (was it renamed?)"
        )
        raise PlanChangedError(
            f"job {self.app.name!r} {now}; this worker runs plan version {self.plan_version} "
            "and stops (its batches can no longer commit)",
            hint=f"deploy the current code and start it again: pgstream run {self.target}",
        )

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if (
                    time.monotonic() >= self._next_maintenance
                    or self.db.generation != self._generation
                    or self._group_changed()
                ):
                    self._maintain()
                done = self._poll_all()
                failures = 0
            except (psycopg.OperationalError, CommitOutcomeUnknown) as exc:
                failures += 1
                self._back_off(failures, exc, "while running")
                continue
            self.observer.polled(self.current)
            if done == 0:
                if self.stop_when_idle and self._caught_up():
                    return
                self._idle(self.settings.poll_interval)

    def _group_changed(self) -> bool:
        """Whether the group changed since this worker last checked its share."""
        return self.group is not None and self.group.changed.is_set()

    def _idle(self, seconds: float) -> None:
        """Wait ``seconds`` before polling again, less if asked to stop or the group changed."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and not self._group_changed():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, IDLE_SLICE))

    def _back_off(self, failures: int, exc: BaseException, phase: str) -> None:
        """After a lost session: drop it, give up after ``max_retries``, else wait and retry."""
        self.db.reset()
        text = str(exc).strip()
        first = text.splitlines()[0] if text else repr(exc)
        if failures > self.settings.max_retries:
            raise DatabaseError(
                f"lost the database {phase} and could not get it back after "
                f"{failures - 1} retries: {first}"
            ) from exc
        delay = min(5.0, 0.05 * 2**failures)
        log.warning("database error %s, retrying in %.2fs: %s", phase, delay, first)
        self._stop.wait(delay)

    def _poll_all(self) -> int:
        done = 0
        for key, task in list(self.tasks.items()):
            if self._stop.is_set():
                break
            try:
                done += task.poll()
                if self._group_changed():
                    break  # a batch boundary: re-check the share before the next batch
            except LeaseLostError as exc:
                log.warning(
                    "lost the lease on %s/%s: %s", key[0], key[1], exc, extra=_where(*key)
                )
                self.observer.fenced(task.lease, str(exc))
                self._drop(key)
            except SourceError as exc:
                self._forgive(task)
                raise SourceUnavailableError(
                    f"stream {key[0]!r} partition {key[1]}: {exc}"
                ) from exc
            except Exception:
                self._forgive(task)
                raise
        return done

    def current(self) -> Progress:
        """Totals so far: the partitions given up plus the ones held now."""
        tasks = list(self.tasks.values())
        return Progress(
            records=self.summary.records + sum(t.stats.records for t in tasks),
            batches=self.summary.batches + sum(t.stats.batches for t in tasks),
            dead_letters=self.summary.dead_letters + sum(t.stats.dead_letters for t in tasks),
            lag=total_lag((t.head, t.position) for t in tasks),
            partitions=len(tasks),
        )

    def _forgive(self, task: PartitionTask) -> None:
        """A poll failed and this process lives on: its attempt was no death. Without this,
        restarts after a persistent error would walk the batch one record at a time and
        then dead-letter an innocent record as a killer (best effort: a lost connection
        keeps the attempt counted)."""
        if not self.db.is_open:
            return
        try:
            self.leases.forgive_attempt(self.db.conn, task.lease)
        except (psycopg.Error, DatabaseError) as exc:
            log.debug("could not take back the attempt: %s", exc)

    def _caught_up(self) -> bool:
        """Nothing was safely readable on any owned partition, none is left to claim and
        this worker holds its share (else an owner above its share is about to hand one
        over: a worker that joins a busy group must not stop before it gets its share)."""
        if any(t.outage.down for t in self.tasks.values()):
            return False  # a source that went away may hold more when it is back
        owned = set(self.tasks)
        self._maintain(discover=True)
        if not set(self.tasks) <= owned:
            return False  # just claimed a partition: it has not been polled yet
        if len(self.tasks) < self._share:
            return False
        positions = [(s, p, t.position) for (s, p), t in self.tasks.items()]
        if repartition.not_folded_yet(self.db.conn, self.app, positions):
            return False
        return not self.leases.claimable(self.db.conn)

    # -- leases ------------------------------------------------------------------------------

    def _maintain(self, *, discover: bool = False) -> None:
        """Heartbeat, renew owned leases, register new partitions, prune consumed repartition
        rows, hand surplus partitions over and claim free ones up to this worker's share
        (``discover``: look for new partitions now). Runs between batches: at every renewal,
        and as soon as the group changed (:class:`~pgstream.runtime.group.GroupWatcher`)."""
        conn = self.db.conn
        if self.group is not None:
            self.group.changed.clear()
        self._generation = self.db.generation
        self._next_maintenance = time.monotonic() + min(
            self.settings.lease_seconds / 3, DISCOVERY_SECONDS
        )
        self._check_plan_version(conn)
        self._discover(conn, force=discover)
        self.leases.heartbeat(conn)
        if not self._announced:
            self.leases.notify(conn)  # joined: owners above their new share hand over
            self._announced = True
        for key, task in list(self.tasks.items()):
            if not self.leases.renew(conn, task.lease):
                log.warning("lease on %s/%s was taken over", *key, extra=_where(*key))
                self.observer.fenced(task.lease, "taken over")
                self._drop(key)
        repartition.prune_owned(conn, self.app, list(self.tasks))
        self._share = self.leases.fair_share(conn)
        if len(self.tasks) > self._share:
            self._hand_over(conn, len(self.tasks) - self._share)
        elif len(self.tasks) < self._share:
            self._claim(conn)

    def _hand_over(self, conn: psycopg.Connection[Any], surplus: int) -> None:
        """Release ``surplus`` partitions (the last in sorted order, so every worker makes
        the same choice) and tell the group, whose workers below their share claim them."""
        for key in sorted(self.tasks)[-surplus:]:
            lease = self.tasks[key].lease
            self.leases.release(conn, lease)
            self.observer.released(lease)
            self.observer.handed_over(lease)
            log.info("handed %s/%s over (share %d)", key[0], key[1], self._share)
            self._drop(key)
        self.leases.notify(conn)

    def _claim(self, conn: psycopg.Connection[Any]) -> None:
        """Claim free partitions up to this worker's share; never one a live owner holds."""
        for source, partition, pid in self.leases.terminate_stuck_owners(conn):
            log.warning(
                "%s/%s: its owner's session (pid %d) is stuck in a transaction past its lease: "
                "terminated it",
                source,
                partition,
                pid,
            )
        for source, partition in self.leases.claimable(conn):
            if (source, partition) in self.tasks or source not in self.app.sources:
                continue
            lease = self.leases.claim(conn, source, partition)
            if lease is not None:
                self._start_task(lease)
                if len(self.tasks) >= self._share:
                    break

    def _start_task(self, lease: Lease) -> None:
        source = self.app.sources[lease.source]
        states = new_states(self.app, lease.source, lease.partition)
        for state in states.values():
            state.load(self.db.conn)
        pipeline = Pipeline(self.app, lease.source, lease.partition, self._sinks, states)
        reopen: Callable[[], PartitionReader] = functools.partial(
            source.open, lease.partition, OpenContext(self.dsn, pipeline.fields)
        )
        if self.wrap_reader is not None:
            reopen = functools.partial(_wrapped, self.wrap_reader, lease, reopen)
        reader: PartitionReader
        try:
            reader = reopen()
        except SourceUnreachable as exc:
            reader = UnreachableReader(exc)  # the task retries it with back-off
        except SourceError as exc:
            raise SourceUnavailableError(f"stream {lease.source!r}: {exc}") from exc
        log.info(
            "claimed %s/%s at epoch %d (offset %s)%s",
            lease.source,
            lease.partition,
            lease.epoch,
            lease.committed_offset,
            f", taken over from {lease.taken_from}" if lease.taken_from else "",
            extra=_where(lease.source, lease.partition),
        )
        self.tasks[(lease.source, lease.partition)] = PartitionTask(
            job=self.app.name,
            worker=self.worker_id,
            lease=lease,
            initial_offset=source.initial_offset(lease.partition),
            reader=reader,
            pipeline=pipeline,
            db=self.db,
            leases=self.leases,
            settings=self.settings,
            plan_version=self._version(),
            observer=self.observer,
            reopen=reopen,
        )
        self.observer.claimed(lease)

    def _version(self) -> int:
        assert self.plan_version is not None, "the start-up check sets the plan version"
        return self.plan_version

    def _drop(self, key: tuple[str, str]) -> None:
        task = self.tasks.pop(key)
        self._account(task)
        task.close()

    def _account(self, task: PartitionTask) -> None:
        self.summary.records += task.stats.records
        self.summary.batches += task.stats.batches
        self.summary.dead_letters += task.stats.dead_letters
        self.summary.retries += task.stats.retries

    def _shutdown(self) -> None:
        """Release every lease so another worker can take over at once, then disconnect."""
        if self.group is not None:
            self.group.stopping()  # this worker's leave notification below wakes it to stop
        if self._prepared and (self.tasks or self.db.is_open):
            try:
                conn = self.db.conn
                with self.leases.liveness_only(conn):
                    for task in self.tasks.values():
                        self.leases.release(conn, task.lease)
                    self.leases.forget(conn)
                for task in self.tasks.values():
                    self.observer.released(task.lease)
                if self._announced:
                    self.leases.notify(conn)  # left: the others take its partitions now
            except (psycopg.Error, DatabaseError) as exc:
                log.warning("could not release leases cleanly: %s", exc)
        for key in list(self.tasks):
            self._drop(key)
        if self.group is not None:
            self.group.close()
        self.db.close()

    # -- signals -----------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        handler = stop_on_signal(self._stop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous


def _wrapped(wrap: ReaderWrap, lease: Lease, open_: Callable[[], PartitionReader]) -> (
    PartitionReader
):
    return wrap(lease.source, lease.partition, open_())


def _where(stream: str, partition: str) -> dict[str, str]:
    """``extra`` for a log line about one partition (fields of JSON log lines)."""
    return {"stream": stream, "partition": partition}


def accept_plan(app: App, dsn: str, *, target: str = "MODULE:APP") -> int:
    """Check ``app``'s plan and record it as the job's next version if it changed (fencing
    older workers), without running anything; return the version. ``run --workers N
    --accept-changes`` does this once before it starts its workers."""
    worker = Worker(
        app, dsn, install_signal_handlers=False, accept_changes=True, target=target
    )
    try:
        worker._start_up()
    finally:
        worker._shutdown()
    return worker._version()


def run_app(
    app: App,
    dsn: str,
    *,
    stop_when_idle: bool = False,
    settings: Settings | None = None,
    on_commit: ProgressFn | None = None,
    stop_event: threading.Event | None = None,
    accept_changes: bool = False,
    target: str = "MODULE:APP",
    progress: ProgressReporter | None = None,
    observers: Sequence[WorkerObserver] = (),
) -> RunSummary:
    """Run one worker for ``app`` in this process (what ``pgstream run`` does).

    ``stop_event`` lets a caller that installed its own early signal handling ask for a stop
    before the worker has started. ``accept_changes`` records a changed plan as the job's
    next version instead of refusing it; ``target`` (``MODULE:APP``) is named in hints;
    ``progress`` prints the start and progress lines; ``observers`` are told of every event
    of the run (:class:`~pgstream.runtime.observers.WorkerObserver`).
    """
    return Worker(
        app,
        dsn,
        settings=settings,
        stop_when_idle=stop_when_idle,
        on_commit=on_commit,
        stop_event=stop_event,
        accept_changes=accept_changes,
        target=target,
        progress=progress,
        observers=observers,
    ).run()

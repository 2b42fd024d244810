"""The observer interface: the events a worker reports over a small run, in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest
from memory_source import MemorySource

import pgstream as ps
from pgstream.runtime.leases import Lease, LeaseManager
from pgstream.runtime.observers import CommitCallback, Observers, WorkerObserver
from pgstream.runtime.pipeline import DeadLetter
from pgstream.runtime.progress import Progress, ProgressReporter
from pgstream.runtime.task import PartitionTask
from pgstream.runtime.worker import RunSummary, Worker

Event = tuple[Any, ...]


class Recorder(WorkerObserver):
    """Notes every event but ``polled`` (counted apart: how often depends on timing)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.polls = 0

    def started(self, job: str, streams: int, partitions: int) -> None:
        self.events.append(("started", job, streams, partitions))

    def claimed(self, lease: Lease) -> None:
        self.events.append(("claimed", lease.partition, lease.epoch))

    def committed(self, task: PartitionTask, records: int) -> None:
        self.events.append(("committed", task.partition, task.position, records))

    def dead_lettered(self, task: PartitionTask, dead: Sequence[DeadLetter]) -> None:
        self.events.append(("dead_lettered", task.partition, [d.offset for d in dead]))

    def retried(self, task: PartitionTask, attempt: int, error: BaseException | None) -> None:
        self.events.append(("retried", task.partition, attempt))

    def fenced(self, lease: Lease, reason: str) -> None:
        self.events.append(("fenced", lease.partition, lease.epoch))

    def released(self, lease: Lease) -> None:
        self.events.append(("released", lease.partition))

    def polled(self, progress: Callable[[], Progress]) -> None:
        self.polls += 1

    def stopped(self, summary: RunSummary) -> None:
        self.events.append(("stopped", summary.records, summary.batches, summary.dead_letters))


def _app(source: MemorySource) -> ps.App:
    app = ps.App("observed", batch_size=2, lease_seconds=5)
    app.stream("events", source).map(lambda r: {"n": 10 // r["n"]}).to_table("out")
    return app


def _source() -> MemorySource:
    # partition 0: three good records; partition 1: a record the map fails on (1 // 0), then one
    return MemorySource("mem", {"0": [{"n": 1}, {"n": 2}, {"n": 5}], "1": [{"n": 0}, {"n": 10}]})


@pytest.fixture
def out_table(pg_conn: psycopg.Connection[Any]) -> None:
    pg_conn.execute(
        "CREATE TABLE out (n bigint, _source text, _partition text, _offset bigint, _seq int, "
        "UNIQUE (_source, _partition, _offset, _seq))"
    )


@pytest.mark.usefixtures("out_table")
def test_a_small_run_reports_its_events_in_order(pg_dsn: str) -> None:
    recorder = Recorder()
    commits: list[tuple[str, int]] = []
    worker = Worker(
        _app(_source()),
        pg_dsn,
        stop_when_idle=True,
        install_signal_handlers=False,
        observers=[recorder],
        on_commit=lambda task, n: commits.append((task.partition, n)),
    )
    worker.run()
    assert recorder.events == [
        ("started", "observed", 1, 2),
        ("claimed", "0", 1),
        ("claimed", "1", 1),
        ("committed", "0", 2, 2),
        ("dead_lettered", "1", [0]),
        ("committed", "1", 2, 2),
        ("committed", "0", 3, 1),
        ("released", "0"),
        ("released", "1"),
        ("stopped", 5, 3, 1),
    ]
    assert recorder.polls >= 2
    # the on_commit callback is an observer too: told of the same commits
    assert commits == [("0", 2), ("1", 2), ("0", 1)]


@pytest.mark.usefixtures("out_table")
def test_a_lease_lost_to_a_takeover_is_reported_as_fenced(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    source = MemorySource("mem", {"0": [{"n": 1}] * 5})
    recorder = Recorder()
    worker = Worker(_app(source), pg_dsn, install_signal_handlers=False, observers=[recorder])
    worker._start_up()
    worker._maintain()
    assert worker._poll_all() == 2
    pg_conn.execute("UPDATE pgstream.partitions SET lease_expires_at = now() - interval '1s'")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert LeaseManager("observed", "thief", 5).claim(conn, "events", "0") is not None
    worker._poll_all()
    worker._shutdown()
    assert recorder.events == [
        ("started", "observed", 1, 1),
        ("claimed", "0", 1),
        ("committed", "0", 2, 2),
        ("fenced", "0", 1),
    ]
    assert worker.tasks == {}


def test_observers_are_told_in_order_and_a_commit_callback_only_of_commits() -> None:
    calls: list[str] = []

    class Named(WorkerObserver):
        def __init__(self, name: str) -> None:
            self.name = name

        def released(self, lease: Lease) -> None:
            calls.append(f"{self.name}:{lease.partition}")

        def committed(self, task: PartitionTask, records: int) -> None:
            calls.append(f"{self.name}:{records}")

    lease = Lease("s", "7", 1, None, 0)
    task: Any = object()
    callback = CommitCallback(lambda t, n: calls.append(f"cb:{n}"))
    fan = Observers([Named("a"), callback, Named("b")])
    fan.released(lease)
    fan.committed(task, 3)
    fan.fenced(lease, "gone")
    assert calls == ["a:7", "b:7", "a:3", "cb:3", "b:3"]


def test_the_progress_reporter_computes_totals_only_when_a_line_is_due(
    caplog: pytest.LogCaptureFixture,
) -> None:
    totals: list[int] = []

    def progress() -> Progress:
        totals.append(1)
        return Progress(records=10, batches=1, dead_letters=0, lag=3, partitions=1)

    quiet = ProgressReporter(0, "database x")
    quiet.started("job", 1, 1)
    quiet.polled(progress)
    assert totals == []
    eager = ProgressReporter(1e-9, "database x")
    with caplog.at_level("INFO", logger="pgstream.progress"):
        eager.started("shop", 1, 1)
        eager.polled(progress)
    assert totals == [1]
    assert 'job "shop": 10 records' in caplog.records[-1].getMessage()


"""What a worker tells the world while it runs: the observer interface.

The worker and its partition tasks call a :class:`WorkerObserver` at each event of a run
(started, partition claimed, batch committed, retried, records dead-lettered, lease lost to
fencing, partition released or handed over, stopped). Progress lines
(:mod:`pgstream.runtime.progress`) and the ``on_commit`` callback are observers; metrics and
structured logs plug in the same way, without the runtime importing them. Observers run on the
worker's thread, inside its loop: they must be quick and must not raise (an exception stops the
worker, as ``on_commit``'s did).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from pgstream.runtime.leases import Lease
from pgstream.runtime.pipeline import BatchOutput, DeadLetter

if TYPE_CHECKING:
    from pgstream.runtime.progress import Progress
    from pgstream.runtime.task import PartitionTask
    from pgstream.runtime.worker import RunSummary

__all__ = ["CommitCallback", "Observers", "WorkerObserver"]


class WorkerObserver:
    """Hooks a worker calls as it runs; every hook does nothing unless overridden."""

    def started(self, job: str, streams: int, partitions: int) -> None:
        """The worker checked the app and registered its ``partitions`` over ``streams``."""

    def claimed(self, lease: Lease) -> None:
        """The worker leased a partition and will process it from ``lease.committed_offset``."""

    def committed(self, task: PartitionTask, records: int) -> None:
        """A batch of ``records`` input records committed (``task.position`` is its end)."""

    def batch_committed(self, task: PartitionTask, out: BatchOutput, seconds: float) -> None:
        """The batch that just committed (told before :meth:`committed`): ``out`` is what it
        wrote (``out.records_in``, ``out.written`` rows per sink table, ``out.dead``) and its
        transaction took ``seconds``, retries included."""

    def late_records(self, task: PartitionTask, records: int) -> None:
        """The batch that just committed set ``records`` late records aside (event time)."""

    def dead_lettered(self, task: PartitionTask, dead: Sequence[DeadLetter]) -> None:
        """The batch that just committed set ``dead`` aside as dead letters."""

    def retried(self, task: PartitionTask, attempt: int, error: BaseException | None) -> None:
        """A transient error failed ``attempt`` of a batch transaction; it runs again."""

    def fenced(self, lease: Lease, reason: str) -> None:
        """The worker lost a partition's lease (taken over, or a stale epoch at commit)."""

    def released(self, lease: Lease) -> None:
        """The worker gave a partition up (surplus of its fair share, or stopping)."""

    def handed_over(self, lease: Lease) -> None:
        """The partition just released was surplus of this worker's fair share: a rebalance
        hands it to a worker below its share (told after :meth:`released`)."""

    def polled(self, progress: Callable[[], Progress]) -> None:
        """A pass over the owned partitions ended; ``progress()`` computes the totals."""

    def stopped(self, summary: RunSummary) -> None:
        """The worker stopped after doing ``summary``."""


class Observers(WorkerObserver):
    """Tells each of several observers, in order."""

    def __init__(self, observers: Iterable[WorkerObserver] = ()) -> None:
        self.observers = list(observers)

    def started(self, job: str, streams: int, partitions: int) -> None:
        for o in self.observers:
            o.started(job, streams, partitions)

    def claimed(self, lease: Lease) -> None:
        for o in self.observers:
            o.claimed(lease)

    def committed(self, task: PartitionTask, records: int) -> None:
        for o in self.observers:
            o.committed(task, records)

    def batch_committed(self, task: PartitionTask, out: BatchOutput, seconds: float) -> None:
        for o in self.observers:
            o.batch_committed(task, out, seconds)

    def late_records(self, task: PartitionTask, records: int) -> None:
        for o in self.observers:
            o.late_records(task, records)

    def dead_lettered(self, task: PartitionTask, dead: Sequence[DeadLetter]) -> None:
        for o in self.observers:
            o.dead_lettered(task, dead)

    def retried(self, task: PartitionTask, attempt: int, error: BaseException | None) -> None:
        for o in self.observers:
            o.retried(task, attempt, error)

    def fenced(self, lease: Lease, reason: str) -> None:
        for o in self.observers:
            o.fenced(lease, reason)

    def released(self, lease: Lease) -> None:
        for o in self.observers:
            o.released(lease)

    def handed_over(self, lease: Lease) -> None:
        for o in self.observers:
            o.handed_over(lease)

    def polled(self, progress: Callable[[], Progress]) -> None:
        for o in self.observers:
            o.polled(progress)

    def stopped(self, summary: RunSummary) -> None:
        for o in self.observers:
            o.stopped(summary)


class CommitCallback(WorkerObserver):
    """The ``on_commit(task, records)`` callback of :class:`~pgstream.runtime.worker.Worker`."""

    def __init__(self, fn: Callable[[PartitionTask, int], None]) -> None:
        self.fn = fn

    def committed(self, task: PartitionTask, records: int) -> None:
        self.fn(task, records)

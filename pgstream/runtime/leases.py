"""Partition leases: claim (bumping the epoch), renew, release, and a fair share per worker.

Safety never depends on leases: the epoch compare-and-set in every batch transaction fences
a stale owner. Leases (timed by the database clock) and the owner's backend identity only
decide *when* another worker may take over: at once when the owner's session is provably
gone, after ``lease_seconds`` otherwise.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors

from pgstream.db import queries
from pgstream.runtime.group import payload


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed partition: the epoch this worker commits under and where it starts."""

    source: str
    partition: str
    epoch: int
    committed_offset: int | None
    attempts: int
    source_instance: str | None = None  # the stream instance its offsets belong to
    #: the other worker this claim took the partition from (its lease expired or its
    #: session is gone); None for a released, fenced or never-owned row
    taken_from: str | None = None

    @property
    def takeover(self) -> bool:
        """Whether the claim took the partition from another worker."""
        return self.taken_from is not None


#: how long a claim waits for a partition row locked by its owner's batch in flight
CLAIM_LOCK_TIMEOUT_MS = 100


class LeaseManager:
    """Lease operations of one worker of one job, on the worker's autocommit connection."""

    def __init__(
        self, job: str, worker: str, lease_seconds: float, streams: Iterable[str] | None = None
    ) -> None:
        self.job = job
        self.worker = worker
        self.lease_seconds = lease_seconds
        #: the app's streams: only their partitions are counted and claimable (None: all)
        self.streams = None if streams is None else sorted(streams)

    def params(self, **extra: Any) -> dict[str, Any]:
        """This worker's parameters of the lease queries, plus ``extra``."""
        return self._params(**extra)

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {
            "job": self.job,
            "worker": self.worker,
            "lease": self.lease_seconds,
            "streams": self.streams,
            **extra,
        }

    def register(self, conn: psycopg.Connection[Any], source: str, partitions: list[str]) -> None:
        """Make sure a partition row exists for every partition of ``source``."""
        conn.execute(
            queries.REGISTER_PARTITIONS, self._params(source=source, partitions=partitions)
        )

    @contextmanager
    def liveness_only(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """One transaction for writes that only help liveness (heartbeats, releasing leases):
        its COMMIT does not wait for the disk; a server crash may forget it, which costs a
        lease expiry or a stale worker count, never safety (epochs fence, not these rows)."""
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            yield

    def heartbeat(self, conn: psycopg.Connection[Any]) -> None:
        """Announce this worker as alive (used for the fair share)."""
        with self.liveness_only(conn):
            conn.execute(
                queries.HEARTBEAT,
                self._params(hostname=socket.gethostname(), pid=os.getpid()),
            )
            conn.execute(queries.PRUNE_WORKERS, self._params())

    def fair_share(self, conn: psycopg.Connection[Any]) -> int:
        """How many partitions this worker should own. The live workers, in the order they
        all agree on (most partitions owned first, then the oldest: see
        ``queries.LIVE_WORKER_IDS``), split the partitions evenly: each gets
        ``partitions // workers``, and the first ``partitions % workers`` one more. The
        shares add up to the partitions, so a worker below its share always finds a free
        partition or an owner above its share that hands one over, and a partition moves
        only from a worker above its share to one below it (never back and forth)."""
        total = _scalar(conn, queries.COUNT_PARTITIONS, self._params())
        rows = conn.execute(queries.LIVE_WORKER_IDS, self._params()).fetchall()
        live = [str(r[0]) for r in rows]
        rank = live.index(self.worker) if self.worker in live else len(live)
        return share_of(total, max(len(live), rank + 1), rank)

    def notify(self, conn: psycopg.Connection[Any]) -> None:
        """Tell the job's other workers that the group changed (a join, a hand-over, a leave):
        they re-check their share after their batch in flight."""
        conn.execute(queries.NOTIFY_GROUP, {"payload": payload(self.job, self.worker)})

    def claimable(self, conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
        """Partitions of the app's streams with no live owner."""
        rows = conn.execute(queries.CLAIMABLE, self._params()).fetchall()
        return [(r[0], r[1]) for r in rows]

    def orphan_streams(self, conn: psycopg.Connection[Any]) -> list[str]:
        """Streams with partition rows in this job that the app no longer has."""
        rows = conn.execute(queries.ORPHAN_STREAMS, self._params()).fetchall()
        return [str(r[0]) for r in rows]

    def terminate_stuck_owners(self, conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
        """End the sessions of owners stuck in a transaction past their lease (see
        ``queries.TERMINATE_STUCK_OWNERS``); returns (source, partition, backend pid) of each.
        Without the privilege to signal them, nothing is done: the claim waits instead."""
        try:
            rows = conn.execute(queries.TERMINATE_STUCK_OWNERS, self._params()).fetchall()
        except psycopg.errors.InsufficientPrivilege:
            return []
        return [(r[0], r[1], int(r[2])) for r in rows if r[3]]

    def claim(self, conn: psycopg.Connection[Any], source: str, partition: str) -> Lease | None:
        """Take over a partition in its own transaction (bumping the epoch), if it is free.

        A partition row locked by a batch in flight is not free, whatever its lease says:
        the claim gives up after :data:`CLAIM_LOCK_TIMEOUT_MS` instead of waiting behind it
        (forever, if that owner is frozen; it is terminated by a later pass, see
        :meth:`terminate_stuck_owners`)."""
        try:
            with conn.transaction():
                conn.execute(queries.SET_LOCK_TIMEOUT, {"ms": f"{CLAIM_LOCK_TIMEOUT_MS}ms"})
                row = conn.execute(
                    queries.CLAIM, self._params(source=source, partition=partition)
                ).fetchone()
        except psycopg.errors.LockNotAvailable:
            return None
        if row is None:
            return None
        taken_from = row[4] if row[4] != self.worker else None
        return Lease(source, partition, row[0], row[1], row[2], row[3], taken_from)

    def renew(self, conn: psycopg.Connection[Any], lease: Lease) -> bool:
        """Extend a lease (and re-announce this session); False if it was lost."""
        row = conn.execute(
            queries.RENEW,
            self._params(source=lease.source, partition=lease.partition, epoch=lease.epoch),
        ).fetchone()
        return row is not None

    def release(self, conn: psycopg.Connection[Any], lease: Lease) -> None:
        """Give a partition up so another worker can take it at once."""
        conn.execute(
            queries.RELEASE,
            self._params(source=lease.source, partition=lease.partition, epoch=lease.epoch),
        )

    def forget(self, conn: psycopg.Connection[Any]) -> None:
        """Remove this worker's heartbeat row (clean exit)."""
        conn.execute(queries.FORGET_WORKER, self._params())

    def bump_attempts(self, conn: psycopg.Connection[Any], lease: Lease) -> int | None:
        """Count one more attempt at the partition's next batch, outside any batch."""
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            row = conn.execute(
                queries.BUMP_ATTEMPTS,
                self._params(source=lease.source, partition=lease.partition, epoch=lease.epoch),
            ).fetchone()
        return None if row is None else int(row[0])

    def forgive_attempt(self, conn: psycopg.Connection[Any], lease: Lease) -> None:
        """Take back the attempt of a poll that failed without killing this worker."""
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            conn.execute(
                queries.FORGIVE_ATTEMPT,
                self._params(source=lease.source, partition=lease.partition, epoch=lease.epoch),
            )

    def read_partition(
        self, conn: psycopg.Connection[Any], source: str, partition: str
    ) -> tuple[int | None, int]:
        """The partition's committed offset and epoch, as committed."""
        row = conn.execute(
            queries.READ_PARTITION, self._params(source=source, partition=partition)
        ).fetchone()
        if row is None:
            raise LookupError(f"partition {source}/{partition} of job {self.job} is not registered")
        return row[0], row[1]


def share_of(partitions: int, workers: int, rank: int) -> int:
    """The share of the worker at ``rank`` (0-based) among ``workers``: an even split of
    ``partitions`` where the first ``partitions % workers`` get one more."""
    base, extra = divmod(partitions, max(1, workers))
    return base + (1 if rank < extra else 0)


def _scalar(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0

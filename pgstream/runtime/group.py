"""Group changes: wake a worker as soon as its job's group changes.

A worker re-checks its share (:meth:`~pgstream.runtime.leases.LeaseManager.fair_share`) at
every lease renewal. :class:`GroupWatcher` makes that happen right after the batch in flight
when the group changes: another worker joined, handed partitions over or left (they say so
with a ``NOTIFY``), or died (no notification: its session is gone, which the watcher sees in
its snapshot of the group, taken every :data:`CHECK_SECONDS`).

It runs on its own thread and connection and only sets :attr:`GroupWatcher.changed`; the
worker loop acts on it at a batch boundary. Liveness only: if the watcher loses its
connection, the worker still rebalances at its next renewal; fencing never depends on it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from pgstream.db import queries
from pgstream.db.connect import connect
from pgstream.errors import DatabaseError

log = logging.getLogger("pgstream.group")

#: how often the watcher compares the group's live workers and orphaned partitions
CHECK_SECONDS = 0.5
#: wait after a lost watcher connection before connecting again
RECONNECT_SECONDS = 1.0


def payload(job: str, worker: str) -> str:
    """The notification payload: the job, then the worker that sent it."""
    return f"{job}\t{worker}"


class GroupWatcher:
    """Sets :attr:`changed` when another worker of ``job`` notifies or the group's live
    workers or orphaned partitions change."""

    def __init__(
        self,
        dsn: str,
        params: dict[str, Any],
        application_name: str,
    ) -> None:
        self.dsn = dsn
        #: the lease manager's parameters: job, worker, lease, streams
        self.params = params
        self.application_name = application_name[:63]
        #: set when the group changed; the worker clears it when it re-checks its share
        self.changed = threading.Event()
        self._closing = threading.Event()
        self._listening = threading.Event()
        #: set by :meth:`start` (or :meth:`close`): the thread, listening, may begin to watch
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgstream-group", daemon=True)

    def connect(self) -> GroupWatcher:
        """Connect and listen on the background thread, without waiting for it: the worker
        calls this before its start-up checks, so the connection is made meanwhile. Until
        :meth:`start`, the thread only listens (a notification is kept until it watches), and
        :meth:`close` ends it at once."""
        if self._thread.ident is None:  # not started yet
            self._thread.start()
        return self

    def start(self, wait: float = 5.0) -> GroupWatcher:
        """Start watching; wait up to ``wait`` seconds until the thread listens, so a
        hand-over to this worker right after it joined is not missed."""
        self.connect()
        self._listening.wait(wait)
        self._go.set()
        return self

    def stopping(self) -> None:
        """Say the watcher is about to be closed: the next notification it receives (such
        as this worker's own leave notification) ends its wait at once."""
        self._closing.set()

    def close(self) -> None:
        """Stop watching: at once after :meth:`stopping` and a notification, else within
        about :data:`CHECK_SECONDS`."""
        self._closing.set()
        self._go.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * CHECK_SECONDS)

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._watch()
            except (psycopg.Error, DatabaseError) as exc:
                self._listening.set()  # do not hold up the worker's start
                log.debug("group watcher lost its connection, reconnecting: %s", exc)
                self.changed.set()  # something may have changed meanwhile: look once
                self._closing.wait(RECONNECT_SECONDS)

    def _watch(self) -> None:
        with connect(self.dsn, autocommit=True, application_name=self.application_name) as conn:
            conn.execute(queries.LISTEN_GROUP)
            self._listening.set()
            self._go.wait()
            mine = payload(self.params["job"], self.params["worker"])
            job = self.params["job"] + "\t"
            last: tuple[Any, ...] | None = None
            while not self._closing.is_set():
                snapshot = conn.execute(queries.GROUP_SNAPSHOT, self.params).fetchone()
                if last is not None and snapshot != last:
                    self.changed.set()
                last = snapshot
                for note in conn.notifies(timeout=CHECK_SECONDS):
                    if note.payload.startswith(job) and note.payload != mine:
                        self.changed.set()
                    if self._closing.is_set():
                        break  # woken to stop: do not wait out the timeout

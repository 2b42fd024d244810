"""The worker's checkpoint connection: durable session settings, lazy reconnect."""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg.types.json import JsonbDumper

from pgstream.db.connect import connect
from pgstream.errors import DatabaseError

SESSION_SETUP = (
    "SET synchronous_commit = on",
    "SET default_transaction_isolation = 'read committed'",
    "SET idle_in_transaction_session_timeout = 0",
)


class WorkerConnection:
    """One autocommit session per worker; batches run explicit ``BEGIN ... COMMIT``.

    ``generation`` increases at every (re)connect so the worker can re-announce its backend
    on the partitions it leases.
    """

    def __init__(self, dsn: str, application_name: str) -> None:
        self.dsn = dsn
        self.application_name = application_name[:63]
        self.generation = 0
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The live connection, reconnecting if it was closed or broken."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._open()
            self.generation += 1
        return self._conn

    @property
    def is_open(self) -> bool:
        """Whether a usable connection is held right now (without connecting)."""
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    def _open(self) -> psycopg.Connection[Any]:
        try:
            conn = connect(self.dsn, autocommit=True, application_name=self.application_name)
        except DatabaseError as exc:
            if self.generation == 0:
                raise  # the first connection: report it as is (wrong DSN, server down)
            # A reconnect that fails (server restarting) is transient like the loss itself:
            # the batch and worker loops retry OperationalError with backoff.
            raise psycopg.OperationalError(f"reconnecting: {exc.message}") from exc
        conn.adapters.register_dumper(dict, JsonbDumper)
        conn.execute("; ".join(SESSION_SETUP))  # one round trip (no parameters: simple query)
        return conn

    def cancel(self) -> None:
        """Cancel the statement in flight, if any (safe from a signal handler)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel()

    def reset(self) -> None:
        """Drop the connection (after an error that may have broken it)."""
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        """Close for good."""
        self.reset()

"""Preparing a database for a demo run: the job's sink tables and a clean slate."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from pgstream.db import queries
from pgstream.db.connect import connect
from pgstream.demo import JOB
from pgstream.demo.schema import metadata
from pgstream.errors import PgStreamError

# Children before parents: batches reference partitions; deleting the job's plan (jobs)
# also deletes its plan versions.
JOB_TABLES = ("dead_letters", "state", "batches", "partitions", "workers", "jobs")

_LIVE_WORKERS = """
SELECT pid, application_name FROM pg_stat_activity
 WHERE application_name LIKE %s AND pid <> pg_backend_pid()
"""


def live_workers(conn: psycopg.Connection[Any]) -> list[str]:
    """``application_name`` of every session of a running demo worker."""
    rows = conn.execute(_LIVE_WORKERS, [f"pgstream:{JOB}:%"]).fetchall()
    return [str(r[1]) for r in rows]


def reset(dsn: str) -> None:
    """Recreate the demo's sink tables and delete the demo job's pgstream rows.

    Refuses while a demo worker is still connected, since it would keep writing.
    """
    with connect(dsn, autocommit=True) as conn:
        running = live_workers(conn)
        deadline = time.monotonic() + 3.0
        while running and time.monotonic() < deadline:  # a closed session may linger briefly
            time.sleep(0.1)
            running = live_workers(conn)
        if running:
            pids = ", ".join(name.rsplit(":", 1)[-1] for name in running)
            raise PgStreamError(
                f"a {JOB} worker is still running (pid {pids})",
                hint="let it finish or stop it (kill PID), then run pgstream demo again",
            )
        with conn.transaction():
            for table in JOB_TABLES:
                conn.execute(queries.delete_job_rows(table), {"job": JOB})
    create_tables(dsn, drop=True)


def create_tables(dsn: str, *, drop: bool = False) -> None:
    """``metadata.create_all`` — what the user's Alembic migration does in a real project."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: connect(dsn), poolclass=NullPool
    )
    try:
        with engine.begin() as conn:
            if drop:
                metadata.drop_all(conn)
            metadata.create_all(conn)
    finally:
        engine.dispose()


__all__ = ["JOB_TABLES", "create_tables", "live_workers", "reset"]

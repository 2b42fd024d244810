"""Partitions that appear while a worker runs are registered, claimed and read: in the lease
maintenance of a running worker, and before a ``stop_when_idle`` worker calls itself idle."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from memory_source import MemorySource

import pgstream as ps
from pgstream.runtime.task import PartitionTask
from pgstream.runtime.worker import Worker


def _app(source: MemorySource) -> ps.App:
    app = ps.App("new-parts", batch_size=50, lease_seconds=5)
    app.stream("events", source).map(lambda r: {"n": r["n"]}).to_table("out")
    return app


def _table(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE out (n bigint, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )


def _rows(conn: psycopg.Connection[Any]) -> list[tuple[str, int, int]]:
    return sorted(conn.execute("SELECT _partition, _offset, n FROM out").fetchall())


def test_a_partition_added_while_running_is_claimed_and_read(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    _table(pg_conn)
    source = MemorySource("mem", {"a": [{"n": i} for i in range(10)]})
    worker = Worker(_app(source), pg_dsn, install_signal_handlers=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        ps_wait(lambda: len(_rows(pg_conn)) == 10)
        source.add_partition("b", *({"n": 100 + i} for i in range(7)))
        ps_wait(lambda: len(_rows(pg_conn)) == 17, timeout=15)
    finally:
        worker.stop()
        thread.join(30)
    assert _rows(pg_conn) == sorted(
        [("a", i, i) for i in range(10)] + [("b", i, 100 + i) for i in range(7)]
    )
    parts = pg_conn.execute(
        "SELECT partition, committed_offset, source_identity FROM pgstream.partitions "
        "WHERE job = 'new-parts' ORDER BY partition"
    ).fetchall()
    assert parts == [("a", 10, "memory mem"), ("b", 7, "memory mem")]


def test_stop_when_idle_sees_a_partition_that_appeared_before_it_was_idle(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    _table(pg_conn)
    source = MemorySource("mem", {"a": [{"n": i} for i in range(120)]})
    added: list[bool] = []

    def on_commit(task: PartitionTask, records: int) -> None:
        if not added:
            added.append(True)
            source.add_partition("z", {"n": -1}, {"n": -2})

    summary = Worker(
        _app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False,
        on_commit=on_commit,
    ).run()
    assert summary.records == 122
    assert [r for r in _rows(pg_conn) if r[0] == "z"] == [("z", 0, -1), ("z", 1, -2)]


def ps_wait(predicate: Any, timeout: float = 10.0) -> None:
    """Poll until ``predicate()`` is true."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)

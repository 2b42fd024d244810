"""The PostgreSQL server crash-restarts mid-run (issue 3 part 4).

A throwaway cluster (``initdb``/``pg_ctl`` in a temporary directory, its own port; never
the shared server) serves a job of 200,000 records. Twice during the run it is stopped
with ``pg_ctl -m immediate`` (every backend killed, no shutdown checkpoint: crash recovery
on start) and started again. The worker keeps retrying the batch and reconnecting, and
finishes: every committed batch survived (``synchronous_commit = on``), nothing in flight
leaked, nothing was applied twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netfaults import (
    SINK_DDL,
    Cluster,
    assert_exact,
    assert_ledger_tiles,
    background,
    expected_from,
    make_app,
    verify_clean,
    write_events,
)

from pgstream.db import migrate
from pgstream.db.connect import connect
from pgstream.runtime.worker import Worker

N = 200_000
BATCH = 2_000


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    try:
        c = Cluster()
    except (FileNotFoundError, KeyError) as exc:
        pytest.skip(f"cannot create a throwaway cluster: {exc}")
    try:
        c.start()
        yield c
    finally:
        c.destroy()


@pytest.mark.slow
def test_worker_survives_immediate_server_restarts(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE job")
    dsn = cluster.dsn("job")
    migrate.upgrade(dsn)
    with connect(dsn, autocommit=True) as conn:
        conn.execute(SINK_DDL)
    path = tmp_path / "events.jsonl"
    write_events(path, 0, N, users=300)
    app = make_app("restart", path, batch_size=BATCH)
    caplog.set_level(logging.WARNING, logger="pgstream")

    commits = [0]
    progressed = threading.Condition()

    def on_commit(task: Any, n: int) -> None:
        with progressed:
            commits[0] += 1
            progressed.notify_all()

    restarts: list[int] = []

    def crasher(stop: threading.Event) -> None:
        for at in (15, 55):  # commits before each crash (100 batches in all)
            with progressed:

                def reached(a: int = at) -> bool:
                    return commits[0] >= a

                if not progressed.wait_for(reached, timeout=60):
                    return
            if stop.is_set():
                return
            cluster.restart_immediate(down=0.7)
            restarts.append(commits[0])

    worker = Worker(app, dsn, stop_when_idle=True, install_signal_handlers=False,
                    on_commit=on_commit)
    with background(crasher):
        summary = worker.run()

    assert len(restarts) == 2, f"the server was restarted {len(restarts)} times"
    assert summary.records >= N - BATCH * 2  # records of batches resolved as landed excepted
    messages = [r.getMessage() for r in caplog.records]
    assert any("reconnecting" in m or "transient error" in m or "database error" in m
               for m in messages), "the worker never saw the server go away"

    data = path.read_bytes()
    with connect(dsn, autocommit=True) as conn:
        committed = assert_ledger_tiles(conn, "restart", {("events", "0"): 0})
        assert committed == {("events", "0"): len(data)}
        assert_exact(conn, "restart", expected_from(data))
    verify_clean(app, dsn)

"""``pg_terminate_backend`` on the worker's sessions at random moments (issue 3 part 3).

A worker processes 200,000 records while another thread terminates every session of the
test database whose ``application_name`` is ``pgstream:%`` at random intervals, whatever
the worker is doing (reading its lease, bumping attempts, in the middle of a batch
transaction, in COMMIT). The worker reconnects, retries the batch or resolves the COMMIT
from its partition row, and finishes: every output exactly once, the ledger tiles.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from netfaults import (
    SINK_DDL,
    assert_exact,
    assert_ledger_tiles,
    background,
    expected_from,
    make_app,
    terminate_sessions,
    verify_clean,
    write_events,
)

from pgstream.db.connect import connect
from pgstream.runtime.worker import Worker

N = 200_000


def test_terminated_sessions_lose_and_double_nothing(
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg_conn.execute(SINK_DDL)
    path = tmp_path / "events.jsonl"
    write_events(path, 0, N, users=500)
    app = make_app("terminate", path, batch_size=4_000)
    caplog.set_level(logging.WARNING, logger="pgstream")

    rng = random.Random(5)
    kills: list[float] = []
    started = threading.Event()

    def killer(stop: threading.Event) -> None:
        with connect(pg_dsn, autocommit=True) as conn:
            started.wait(30)
            while not stop.wait(rng.uniform(0.05, 0.45)):
                n = terminate_sessions(conn)
                if n:
                    kills.append(time.monotonic())
                if len(kills) >= 20:
                    return

    def first_commit(task: Any, n: int) -> None:
        started.set()

    worker = Worker(
        app, pg_dsn, stop_when_idle=True, install_signal_handlers=False, on_commit=first_commit
    )
    t0 = time.monotonic()
    with background(killer):
        summary = worker.run()
    print(f"run {time.monotonic() - t0:.1f}s, {len(kills)} terminations, {summary}")

    assert len(kills) >= 5, f"only {len(kills)} terminations happened during the run"
    messages = [r.getMessage() for r in caplog.records]
    hit = [m for m in messages if "transient error" in m or "database error" in m
           or "COMMIT outcome" in m]
    assert hit, "no termination hit the worker"
    assert summary.records == N

    data = path.read_bytes()
    committed = assert_ledger_tiles(pg_conn, "terminate", {("events", "0"): 0})
    assert committed == {("events", "0"): len(data)}
    assert_exact(pg_conn, "terminate", expected_from(data))
    t1 = time.monotonic()
    verify_clean(app, pg_dsn)
    print(f"verify {time.monotonic() - t1:.1f}s")

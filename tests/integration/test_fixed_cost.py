"""The fixed cost of a run stays small (issue 8, part 5): a worker that stops does not wait
out its group watcher's poll, and start-up makes few round trips."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from pgstream.db import queries
from pgstream.runtime import group
from pgstream.runtime.group import GroupWatcher, payload


def test_a_stopping_watcher_ends_at_the_leave_notification(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group, "CHECK_SECONDS", 5.0)  # waiting it out would take 5 s
    params = {"job": "fixed", "worker": "w1", "lease": 30.0, "streams": ["s"]}
    watcher = GroupWatcher(pg_dsn, params, "pgstream-group:test").start()
    time.sleep(0.2)  # inside its wait for notifications
    started = time.monotonic()
    watcher.stopping()
    pg_conn.execute(queries.NOTIFY_GROUP, {"payload": payload("fixed", "w1")})  # its own leave
    watcher.close()
    assert time.monotonic() - started < 2.0
    assert not watcher._thread.is_alive()
    assert not watcher.changed.is_set()  # its own notification is no group change

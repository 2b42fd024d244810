"""The fixed cost of a run stays small (issue 8, part 5): a worker that stops does not wait
out its group watcher's poll, and start-up makes few round trips."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.db import queries
from pgstream.runtime import group
from pgstream.runtime.group import GroupWatcher, payload
from pgstream.runtime.worker import run_app


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


def test_a_watcher_closed_before_it_starts_ends_at_once(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker connects its watcher before the start-up checks: when they fail, closing
    it must not wait out a poll."""
    monkeypatch.setattr(group, "CHECK_SECONDS", 5.0)
    params = {"job": "fixed", "worker": "w1", "lease": 30.0, "streams": ["s"]}
    watcher = GroupWatcher(pg_dsn, params, "pgstream-group:test").connect()
    assert watcher._listening.wait(5.0)
    started = time.monotonic()
    watcher.close()
    assert time.monotonic() - started < 2.0
    assert not watcher._thread.is_alive()


def test_a_notification_before_the_watcher_starts_is_kept(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    params = {"job": "fixed", "worker": "w1", "lease": 30.0, "streams": ["s"]}
    watcher = GroupWatcher(pg_dsn, params, "pgstream-group:test").connect()
    try:
        assert watcher._listening.wait(5.0)
        pg_conn.execute(queries.NOTIFY_GROUP, {"payload": payload("fixed", "w2")})  # w2 joined
        time.sleep(0.2)
        assert not watcher.changed.is_set()  # connected and listening, not watching yet
        watcher.start()
        assert watcher.changed.wait(2.0)
    finally:
        watcher.close()


#: statements a one-line run sends on its own connection: session set-up, privilege, schema and
#: sink checks, plan check, registration, claim, one batch, the idle decision, the release
#: (46 when this was written; 51 before the session settings, the sink check and the schema
#: check became one statement each)
MAX_STATEMENTS = 46


def test_a_one_line_run_makes_few_round_trips(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "one.jsonl"
    data.write_text('{"id": 1, "user": "u1", "amount": 5}\n')
    pg_conn.execute('CREATE TABLE totals ("user" text PRIMARY KEY, n bigint, total bigint)')
    app = ps.App("fixed_cost")
    app.stream("events", ps.FileSource(str(data))).key_by("user").aggregate(
        n=ps.count(), total=ps.sum("amount")
    ).to_table("totals")
    sent: list[str] = []
    execute = psycopg.Cursor.execute

    def counting(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():  # not the group watcher
            sent.append(str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    summary = run_app(app, pg_dsn, stop_when_idle=True)
    monkeypatch.undo()
    assert summary.records == 1
    assert pg_conn.execute("SELECT * FROM totals").fetchall() == [("u1", 1, 5)]
    assert 0 < len(sent) <= MAX_STATEMENTS, "\n".join(s.split("\n")[0][:80] for s in sent)


def test_version_is_read_only_when_asked() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pgstream", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("pgstream, version ")

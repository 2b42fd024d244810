"""Transient database errors (issue 3 part 6, README "Guarantees", invariant 7).

``PGSTREAM_INJECT_ERRORS`` makes the batch transaction raise real server-side SQLSTATEs:
serialization failure (40001), deadlock (40P01), query cancel (57014) and disk full (53100).

* At a rate of 0.3 every failed attempt rolls back whole and the batch is retried with
  backoff: the result is exact and each batch commits once (the ledger tiles).
* At a rate of 1.0 the error is persistent: ``pgstream run`` stops after ``max_retries``
  attempts with one ``error:`` line naming the batch and the SQLSTATE, exit code 1, no
  traceback, and nothing was committed (no ledger row, no offset, empty sinks).
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from netfaults import (
    SINK_DDL,
    assert_exact,
    assert_ledger_tiles,
    expected_from,
    ledger,
    make_app,
    verify_clean,
    write_events,
)

from pgstream.errors import DatabaseError
from pgstream.runtime import crashpoints
from pgstream.runtime.worker import Worker

CODES = ["40001", "40P01", "57014", "53100"]
HERE = Path(__file__).resolve().parent


def test_injected_transient_errors_are_retried_and_the_result_is_exact(
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg_conn.execute(SINK_DDL)
    path = tmp_path / "events.jsonl"
    write_events(path, 0, 12_000)
    app = make_app("transient", path, batch_size=1_000)
    monkeypatch.setattr(crashpoints, "_inject", CODES)
    monkeypatch.setattr(crashpoints, "_inject_rate", 0.3)
    random.seed(20261127)
    caplog.set_level(logging.WARNING, logger="pgstream")

    summary = Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()

    retried = [r.getMessage() for r in caplog.records if "transient error" in r.getMessage()]
    assert summary.retries == len(retried) >= 3, "the injection should have fired"
    seen = {code for code in CODES for m in retried if f"injected fault {code}" in m}
    assert len(seen) >= 3, f"only {seen} were injected"
    data = path.read_bytes()
    assert len(ledger(pg_conn, "transient")) == summary.batches == 12
    assert assert_ledger_tiles(pg_conn, "transient", {("events", "0"): 0}) == {
        ("events", "0"): len(data)
    }
    assert_exact(pg_conn, "transient", expected_from(data))
    verify_clean(app, pg_dsn)


def test_a_persistent_error_stops_the_worker_with_one_clear_line_and_no_partial_commit(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pg_conn.execute(SINK_DDL)
    path = tmp_path / "events.jsonl"
    write_events(path, 0, 2_000)
    (tmp_path / "tapp.py").write_text(
        "import os\n"
        "from netfaults import make_app\n"
        "app = make_app('persistent', os.environ['TAPP_FILE'], batch_size=500)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(HERE)]),
        TAPP_FILE=str(path),
        PGSTREAM_INJECT_ERRORS=",".join(CODES),
        PGSTREAM_INJECT_RATE="1.0",
    )
    res = subprocess.run(
        [sys.executable, "-m", "pgstream", "run", "tapp:app", "--dsn", pg_dsn,
         "--stop-when-idle"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    err = res.stderr
    assert res.returncode == 1, f"exit {res.returncode}:\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "batch [0, " in errors[0] and "was not committed" in errors[0], errors[0]
    assert any(f"SQLSTATE {c}" in errors[0] for c in CODES), errors[0]
    assert "hint:" in err
    # retried with backoff before giving up
    assert err.count("transient error (attempt") == 7, err

    # nothing committed: no ledger, no offset, no outputs, no dead letters
    assert ledger(pg_conn, "persistent") == []
    row = pg_conn.execute(
        "SELECT committed_offset, batches FROM pgstream.partitions WHERE job = 'persistent'"
    ).fetchone()
    assert row == (None, 0)
    for table in ("facts", "totals", "folds", "pgstream.dead_letters"):
        assert pg_conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table


@pytest.mark.slow
def test_restarts_after_a_persistent_error_never_dead_letter_a_record(
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A supervisor restarting a worker that stops on a persistent error (disk full for a
    while) must not make the 'worker died N times on this record' path fire: the worker
    survived each failure, so the attempt is taken back. Once the error clears, the job
    finishes exact with no dead letter."""
    pg_conn.execute(SINK_DDL)
    path = tmp_path / "events.jsonl"
    write_events(path, 0, 1_500)
    app = make_app("restarted", path, batch_size=500)
    fast = app.settings.with_overrides(max_retries=1)
    monkeypatch.setattr(crashpoints, "_inject", ["53100"])
    monkeypatch.setattr(crashpoints, "_inject_rate", 1.0)
    for _ in range(2 * app.settings.max_record_attempts + 2):
        with pytest.raises(DatabaseError, match="SQLSTATE 53100"):
            Worker(app, pg_dsn, settings=fast, stop_when_idle=True,
                   install_signal_handlers=False).run()
        row = pg_conn.execute(
            "SELECT attempts, committed_offset FROM pgstream.partitions WHERE job = 'restarted'"
        ).fetchone()
        assert row == (0, None)
    monkeypatch.setattr(crashpoints, "_inject_rate", 0.0)
    Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    data = path.read_bytes()
    assert_exact(pg_conn, "restarted", expected_from(data))  # no dead letter
    assert assert_ledger_tiles(pg_conn, "restarted", {("events", "0"): 0}) == {
        ("events", "0"): len(data)
    }

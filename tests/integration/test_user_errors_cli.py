"""User-code errors through ``pgstream run`` (issue 11 item 8): the error line and the dead
letters name the user's file and line; ``-v`` adds the full traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

IMPORT_ERROR_APP = """\
import pgstream as ps

SETTINGS = {"region": "eu"}
REGION = SETTINGS["missing"]
app = ps.App("never")
"""

OPERATOR_APP = """\
import os
import pgstream as ps

app = ps.App("ops", on_error=os.environ.get("ON_ERROR", "dead_letter"))
orders = app.stream("orders", ps.FileSource(os.environ["ORDERS"]))


def per_unit(o):
    return {"id": o["id"], "cents": o["amount"] * 100 // o["units"]}


orders.map(per_unit).to_table("per_unit")
"""


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgstream", "run", *args],
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_time_error_shows_file_and_line_and_traceback_with_v(
    tmp_path: Path, pg_dsn: str
) -> None:
    (tmp_path / "app.py").write_text(IMPORT_ERROR_APP)
    plain = run(tmp_path, "app:app", "--dsn", pg_dsn)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.strip() == (
        "error: importing 'app' failed: KeyError: 'missing' (at app.py:4 in <module>)"
    )
    verbose = run(tmp_path, "app:app", "--dsn", pg_dsn, "-v")
    assert verbose.returncode == 2
    assert "Traceback (most recent call last)" in verbose.stderr
    assert 'REGION = SETTINGS["missing"]' in verbose.stderr
    assert verbose.stderr.rstrip().endswith(
        "error: importing 'app' failed: KeyError: 'missing' (at app.py:4 in <module>)"
    )


def setup_operator_app(tmp_path: Path, conn: psycopg.Connection[Any]) -> dict[str, str]:
    (tmp_path / "app.py").write_text(OPERATOR_APP)
    orders = tmp_path / "orders.jsonl"
    orders.write_text(
        "".join(
            json.dumps({"id": i, "amount": i, "units": 0 if i == 7 else 2}) + "\n"
            for i in range(20)
        )
    )
    conn.execute(
        "CREATE TABLE per_unit (id bigint, cents bigint, _source text, _partition text,"
        " _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    return {"ORDERS": str(orders)}


def test_dead_letter_names_file_and_line_and_v_logs_the_traceback(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = setup_operator_app(tmp_path, pg_conn)
    done = run(tmp_path, "app:app", "--dsn", pg_dsn, "--stop-when-idle", "-v", env=env)
    assert done.returncode == 0, done.stderr
    rows = pg_conn.execute("SELECT operator, error FROM pgstream.dead_letters").fetchall()
    assert rows == [
        ("to_table(per_unit)", "ZeroDivisionError: integer division or modulo by zero "
         "(at app.py:9 in per_unit)")
    ]
    assert "Traceback (most recent call last)" in done.stderr
    assert 'return {"id": o["id"], "cents": o["amount"] * 100 // o["units"]}' in done.stderr
    assert pg_conn.execute("SELECT count(*) FROM per_unit").fetchone() == (19,)


def test_on_error_fail_names_file_and_line(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = setup_operator_app(tmp_path, pg_conn)
    done = run(tmp_path, "app:app", "--dsn", pg_dsn, "--stop-when-idle",
               env={**env, "ON_ERROR": "fail"})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    start, first = done.stderr.splitlines()[:2]  # the run's start line, then the error
    assert 'INFO pgstream.progress: job "ops": 1 stream' in start, done.stderr
    assert first.startswith("error: record at offset ")
    assert first.endswith(
        "failed in to_table(per_unit): ZeroDivisionError: integer division or modulo by zero "
        "(at app.py:9 in per_unit)"
    ), done.stderr


def test_batch_handler_error_names_file_and_line(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    import pgstream as ps
    from pgstream.runtime.checkpoint import HandlerError
    from pgstream.runtime.worker import run_app

    orders = tmp_path / "orders.jsonl"
    orders.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(5)))
    app = ps.App("handler")

    @app.batch(app.stream("orders", ps.FileSource(orders)))
    def audit(batch: ps.Batch) -> None:
        totals: dict[str, int] = {}
        batch.execute("SELECT %s", [totals["missing"]])

    try:
        run_app(app, pg_dsn, stop_when_idle=True)
    except HandlerError as exc:
        message = exc.message
    else:
        raise AssertionError("the handler's error did not stop the run")
    line = audit.__code__.co_firstlineno + 3  # the decorator is its first line
    assert message.endswith(
        f"KeyError: 'missing' (at {os.path.relpath(__file__)}:{line} in audit)"
    ), message

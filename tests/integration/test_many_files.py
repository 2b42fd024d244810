"""``FileSource`` over many files (a glob or a directory): one partition per file named by
its path under the pattern's base, new files picked up while running, and a SIGKILLed
``pgstream run`` resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.errors import SourceUnavailableError
from pgstream.runtime.worker import Worker
from pgstream.sources.base import OpenContext, SourceError

APP = """
import os
import time
import pgstream as ps

app = ps.App("many-files", batch_size=200)
events = app.stream("events", ps.FileSource(os.environ["LANDING"] + "/*.jsonl"))
events.map(lambda e: {"id": e["id"]}).to_table("ids")
events.key_by("k").aggregate(n=ps.count(), total=ps.sum("v")).to_table("totals")


@app.batch(events)
def slow(batch: ps.Batch) -> None:
    time.sleep(float(os.environ.get("BATCH_SLEEP", "0")))
"""

TABLES = (
    "CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint, _seq int,"
    " UNIQUE (_source, _partition, _offset, _seq));"
    "CREATE TABLE totals (k text PRIMARY KEY, n bigint, total bigint)"
)


def _write(path: Path, ids: range) -> list[dict[str, Any]]:
    rows = [{"id": i, "k": f"k{i % 7}", "v": i % 13} for i in ids]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _check(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> None:
    got = Counter(r[0] for r in conn.execute("SELECT id FROM ids").fetchall())
    assert got == Counter(r["id"] for r in rows)
    want: dict[str, tuple[int, int]] = {}
    for r in rows:
        n, total = want.get(r["k"], (0, 0))
        want[r["k"]] = (n + 1, total + r["v"])
    totals = conn.execute("SELECT k, n, total FROM totals").fetchall()
    assert {k: (n, total) for k, n, total in totals} == want


def test_partitions_are_files_under_the_base_and_one_file_is_unchanged(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl", ".hidden.jsonl", "x.txt"):
        (tmp_path / name).write_text('{"id": 1}\n')
    conn: Any = None
    flat = ps.FileSource(f"{tmp_path}/*.jsonl")
    assert flat.partitions(conn) == ["a.jsonl", "b.jsonl"]
    assert flat.identity() == f"files {os.path.realpath(tmp_path)}/*.jsonl"
    deep = ps.FileSource(f"{tmp_path}/**/*.jsonl")
    assert deep.partitions(conn) == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]
    reader = deep.open("sub/c.jsonl", OpenContext(""))
    assert reader.read(0, 10).records[0].value == {"id": 1}
    reader.close()
    with pytest.raises(SourceError, match="not a file under"):
        deep.open("../etc/passwd", OpenContext(""))
    folder = ps.FileSource(tmp_path)
    assert folder.partitions(conn) == ["a.jsonl", "b.jsonl", "x.txt"]
    assert folder.identity() == f"files {os.path.realpath(tmp_path)}/[!.]*"
    one = ps.FileSource(tmp_path / "a.jsonl")
    assert one.partitions(conn) == ["0"]
    assert one.identity() == f"file {os.path.realpath(tmp_path / 'a.jsonl')}"
    with pytest.raises(SourceError, match="does not exist"):
        ps.FileSource(f"{tmp_path}/nowhere/*.jsonl").validate(conn)


def test_a_file_added_while_running_is_read_exactly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(TABLES)
    rows = []
    for i in range(3):
        rows += _write(tmp_path / f"f{i}.jsonl", range(i * 1000, i * 1000 + 500))
    app = ps.App("many-files", batch_size=100, lease_seconds=5)
    events = app.stream("events", ps.FileSource(f"{tmp_path}/*.jsonl"))
    events.map(lambda e: {"id": e["id"]}).to_table("ids")
    events.key_by("k").aggregate(n=ps.count(), total=ps.sum("v")).to_table("totals")
    worker = Worker(app, pg_dsn, install_signal_handlers=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    count = "SELECT count(*) FROM ids"
    try:
        _wait(lambda: _scalar(pg_conn, count) == 1500)
        rows += _write(tmp_path / "f3.jsonl", range(3000, 3250))
        _wait(lambda: _scalar(pg_conn, count) == 1750)
    finally:
        worker.stop()
        thread.join(30)
    _check(pg_conn, rows)
    parts = pg_conn.execute(
        "SELECT partition, committed_offset > 0 FROM pgstream.partitions "
        "WHERE job = 'many-files' ORDER BY partition"
    ).fetchall()
    assert parts == [(f"f{i}.jsonl", True) for i in range(4)]


def test_sigkill_mid_run_with_a_new_file_then_rerun_is_exact(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(TABLES)
    (tmp_path / "app.py").write_text(APP)
    landing = tmp_path / "landing"
    landing.mkdir()
    rows = []
    for i in range(3):
        rows += _write(landing / f"f{i}.jsonl", range(i * 10000, i * 10000 + 3000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(LANDING=str(landing), PYTHONUNBUFFERED="1", BATCH_SLEEP="0.05")
    cmd = [sys.executable, "-m", "pgstream", "run", "app:app", "--dsn", pg_dsn]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait(lambda: _scalar(pg_conn, "SELECT count(*) FROM ids") >= 1000, timeout=60)
        rows += _write(landing / "f3.jsonl", range(30000, 31000))
        _wait(
            lambda: _scalar(
                pg_conn,
                "SELECT count(*) FROM pgstream.partitions WHERE job = 'many-files' "
                "AND partition = 'f3.jsonl'",
            ),
            timeout=30,
        )
        assert _scalar(pg_conn, "SELECT count(*) FROM ids") < len(rows), "killed too late"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    env["BATCH_SLEEP"] = "0"
    done = subprocess.run(
        [*cmd, "--stop-when-idle"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _check(pg_conn, rows)
    verify = subprocess.run(
        [sys.executable, "-m", "pgstream", "verify", "app:app", "--dsn", pg_dsn],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _scalar(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_file_deleted_after_it_was_read_fails_loudly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(TABLES)
    _write(tmp_path / "a.jsonl", range(10))
    _write(tmp_path / "b.jsonl", range(10, 20))

    def run() -> None:
        app = ps.App("many-files", batch_size=100, lease_seconds=5)
        events = app.stream("events", ps.FileSource(f"{tmp_path}/*.jsonl"))
        events.map(lambda e: {"id": e["id"]}).to_table("ids")
        events.key_by("k").aggregate(n=ps.count(), total=ps.sum("v")).to_table("totals")
        Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()

    run()
    assert _scalar(pg_conn, "SELECT count(*) FROM ids") == 20
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(SourceUnavailableError, match=r"b\.jsonl.*does not exist"):
        run()

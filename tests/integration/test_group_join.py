"""A worker that joins a busy job gets its share by a hand-over, even under
``--stop-when-idle`` (issue 12, part 4: before, the first worker had claimed every partition
and the second found nothing to claim and stopped at once)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg

APP = """
import time

import pgstream as ps

app = ps.App("join", batch_size=100, max_interval=0.0)


def slow(e):
    time.sleep(0.002)
    return {{"id": e["id"]}}


for name in ("a", "b"):
    app.stream(name, ps.FileSource({tmp!r} + "/" + name + ".jsonl")).map(slow).to_table("out")
"""


def test_a_second_run_started_later_gets_one_of_two_streams(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    n = 1500  # about 3 s of work per stream
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_bytes(
            b"".join(orjson.dumps({"id": i}) + b"\n" for i in range(n))
        )
    (tmp_path / "joinapp.py").write_text(textwrap.dedent(APP.format(tmp=str(tmp_path))))
    pg_conn.execute(
        "CREATE TABLE out (id bigint, _source text, _partition text, _offset bigint, _seq int, "
        "UNIQUE (_source, _partition, _offset, _seq))"
    )
    cmd = [sys.executable, "-m", "pgstream", "run", "joinapp:app", "--dsn", pg_dsn,
           "--stop-when-idle", "-v"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not pg_conn.execute("SELECT count(*) FROM pgstream.batches").fetchone()[0]:  # type: ignore[index]
        assert first.poll() is None and time.monotonic() < deadline, "the first run did nothing"
        time.sleep(0.05)
    second = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    _, err1 = first.communicate(timeout=120)
    _, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err1 + err2).decode()[-3000:]
    per_worker = pg_conn.execute(
        "SELECT worker, array_agg(DISTINCT source ORDER BY source), sum(records_in) "
        "FROM pgstream.batches GROUP BY worker"
    ).fetchall()
    assert len(per_worker) == 2, per_worker  # both did part of the work
    assert b"handed " in err1, err1.decode()[-3000:]  # by a hand-over, not a takeover
    assert b"is stale" not in err1 + err2 and b"was taken over" not in err1 + err2
    assert sum(int(r[2]) for r in per_worker) == 2 * n
    assert pg_conn.execute("SELECT count(*), count(DISTINCT (_source, id)) FROM out").fetchone() \
        == (2 * n, 2 * n)

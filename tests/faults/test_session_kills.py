"""kill -9 while session windows are computed: shuffled, out-of-order input whose sessions
merge across batches, appended to the input file while several ``pgstream run`` processes are
SIGKILLed at random moments (and at the batch transaction's crash points), then a final
``run --stop-when-idle``. Session rows
(update and final, with ``window_end``), late records and dead letters equal the offline
reference of tests/windowref.py, each exactly once, and ``pgstream verify`` is clean."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proctools import wait_for
from windowref import SessionReference, file_records, session_reference

T0 = 1_700_000_000
GAP, GRACE = 6.0, 15.0

APP = """
import os
import pgstream as ps

app = ps.App("sk", batch_size=int(os.environ["BATCH"]))
clicks = app.stream("clicks", ps.FileSource(os.environ["INPUT"]))
keyed = clicks.key_by("user", name="user_id")
for emit in ("update", "final"):
    keyed.window(ps.session(gap=6), time="ts", grace=15, emit=emit).aggregate(
        n=ps.count(), total=ps.sum("v")).to_table("s_" + emit)
"""


def _events(n: int, rng: random.Random) -> list[str]:
    rows = []
    for i in range(n):
        t = T0 + i * 0.5 + (i // 200) * 40 - (rng.random() * 18 if rng.random() < 0.4 else 0)
        if rng.random() < 0.02:
            t -= 150
        rec: dict[str, Any] = {"user": f"u{rng.randrange(5)}", "v": rng.randrange(50), "ts": t}
        if rng.random() < 0.005:
            rec["ts"] = "not a time"
        rows.append(json.dumps(rec))
    return rows


def _check(conn: psycopg.Connection[Any], table: str, ref: SessionReference) -> None:
    rows = conn.execute(f"SELECT user_id, window_start, window_end, n, total FROM {table}")
    stored = {(u, round(ws.timestamp(), 6)): (n, t, round(we.timestamp(), 6))
              for u, ws, we, n, t in rows}
    want = {(u, round(s, 6)): (*v, round(ref.ends[(u, s)], 6)) for (u, s), v in ref.windows.items()}
    assert stored == want, table
    late = conn.execute(
        'SELECT partition, "offset", window_start FROM pgstream.late_records WHERE operator = %s',
        [f"window:{table}"],
    ).fetchall()
    assert len(late) == len(set(late))
    assert sorted((p, off, round(ws.timestamp(), 6)) for p, off, ws in late) == sorted(
        (p, off, round(s, 6)) for p, off, s in ref.late
    ), table


@pytest.mark.slow
def test_sessions_survive_kill_9_exactly(tmp_path: Path, pg_dsn: str) -> None:
    rng = random.Random(int(os.environ.get("PGSTREAM_CRASH_SEED", "0")) or None)
    lines = _events(8_000, rng)
    path = tmp_path / "clicks.jsonl"
    path.write_text("")
    # the input grows between runs (a crash point is then always reached), so sessions also
    # merge across the runs' crashes
    chunk = len(lines) // 7 + 1

    def grow(i: int) -> None:
        with path.open("a") as f:
            f.write("".join(line + "\n" for line in lines[i * chunk : (i + 1) * chunk]))

    (tmp_path / "app.py").write_text(APP)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for t in ("s_update", "s_final"):
            conn.execute(
                f"CREATE TABLE {t} (user_id text, window_start timestamptz, "
                "window_end timestamptz, n bigint, total bigint, "
                "PRIMARY KEY (user_id, window_start))"
            )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(INPUT=str(path), BATCH="120")

    def start(extra: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "pgstream", "run", "app:app", "--dsn", pg_dsn],
            cwd=tmp_path, env={**env, **extra},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def batches() -> int:
        with psycopg.connect(pg_dsn) as c:
            row = c.execute("SELECT count(*) FROM pgstream.batches").fetchone()
        return int(row[0]) if row else 0

    for i in range(6):
        crash = {}
        if i % 3 == 2:
            point = rng.choice(["after_state", "after_sinks", "before_commit", "after_commit"])
            crash = {"PGSTREAM_CRASH_AT": point, "PGSTREAM_CRASH_AFTER": str(rng.randint(1, 4))}
        before = batches()
        grow(i)
        w = start(crash)
        if crash:
            w.wait(timeout=60)
            assert w.returncode == -signal.SIGKILL, (w.stderr.read() if w.stderr else b"")[-2000:]
        else:

            def moved(b: int = before, w: subprocess.Popen[bytes] = w) -> bool:
                return batches() > b or w.poll() is not None

            wait_for(moved, 30, what="a commit")
            time.sleep(rng.random() * 0.7)
            w.send_signal(signal.SIGKILL)
            w.wait(timeout=30)
        if w.stderr:
            w.stderr.close()
    grow(6)
    done = subprocess.run(
        [sys.executable, "-m", "pgstream", "run", "app:app", "--stop-when-idle", "--dsn", pg_dsn],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    recs = {"0": list(file_records(lines))}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table, final in (("s_update", False), ("s_final", True)):
            ref = session_reference(recs, gap=GAP, grace=GRACE, final=final)
            assert ref.late and len(ref.windows) > 50
            _check(conn, table, ref)
        dead = conn.execute('SELECT partition, "offset" FROM pgstream.dead_letters').fetchall()
        assert sorted(dead) == sorted(ref.dead)
        assert len(set(dead)) == len(dead)
    checked = subprocess.run(
        [sys.executable, "-m", "pgstream", "verify", "app:app", "--dsn", pg_dsn],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

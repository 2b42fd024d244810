"""kill -9 while windows are computed: shuffled, out-of-order input with late records and
unreadable times, several ``pgstream run`` processes SIGKILLed at random moments (and at the
batch transaction's crash points), then a final ``run --stop-when-idle``. Window rows (update,
final, hopping), late records and dead letters equal the offline reference of
tests/windowref.py, each exactly once, and ``pgstream verify`` is clean."""

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
from windowref import Reference, file_records, reference

T0 = 1_700_000_000

APP = """
import os
import pgstream as ps

app = ps.App("wk", batch_size=int(os.environ["BATCH"]))
clicks = app.stream("clicks", ps.FileSource(os.environ["INPUT"]))
keyed = clicks.key_by("user", name="user_id")
keyed.window(ps.tumbling(seconds=60), time="ts", grace=15).aggregate(
    n=ps.count(), total=ps.sum("v")).to_table("upd")
if os.environ["ALL"] == "1":
    keyed.window(ps.tumbling(seconds=60), time="ts", grace=15, emit="final").aggregate(
        n=ps.count(), total=ps.sum("v")).to_table("fin")
    keyed.window(ps.hopping(seconds=60, every=20), time="ts", grace=15).aggregate(
        n=ps.count(), total=ps.sum("v")).to_table("hop")
"""


def _events(n: int, rng: random.Random) -> list[str]:
    rows = []
    for i in range(n):
        t = T0 + i * 0.2 + (rng.random() * 10 if rng.random() < 0.9 else -rng.random() * 120)
        rec: dict[str, Any] = {"user": f"u{rng.randrange(7)}", "v": rng.randrange(50), "ts": t}
        if rng.random() < 0.005:
            rec["ts"] = "not a time"
        rows.append(json.dumps(rec))
    rng.shuffle(rows[: n // 2])  # part of the input shuffled at random
    return rows


def _windows(conn: psycopg.Connection[Any], table: str) -> dict[tuple[Any, float], Any]:
    return {
        (u, ws.timestamp()): (n, t)
        for u, ws, n, t in conn.execute(f"SELECT user_id, window_start, n, total FROM {table}")
    }


def _late(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, int, float]]:
    return sorted(
        (p, off, ws.timestamp())
        for p, off, ws in conn.execute(
            'SELECT partition, "offset", window_start FROM pgstream.late_records '
            "WHERE operator = %s",
            [f"window:{table}"],
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("all_sinks", [True, False], ids=["three-windows", "kernel"])
def test_windows_survive_kill_9_exactly(tmp_path: Path, pg_dsn: str, all_sinks: bool) -> None:
    rng = random.Random(int(os.environ.get("PGSTREAM_CRASH_SEED", "0")) or None)
    lines = _events(12_000, rng)
    path = tmp_path / "clicks.jsonl"
    path.write_text("")
    # the input grows before every run, so each run (a crash point after up to 4 batches of
    # 150 included) has new records to work on however fast the earlier runs were
    chunk = len(lines) // 6
    (tmp_path / "app.py").write_text(APP)
    tables = ["upd", "fin", "hop"] if all_sinks else ["upd"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for t in tables:
            conn.execute(
                f"CREATE TABLE {t} (user_id text, window_start timestamptz, n bigint, "
                "total bigint, PRIMARY KEY (user_id, window_start))"
            )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(INPUT=str(path), BATCH="150", ALL="1" if all_sinks else "0")

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

    kills = 0
    for i in range(6):
        crash = {}
        if i % 3 == 2:
            point = rng.choice(["after_state", "after_sinks", "before_commit", "after_commit"])
            crash = {"PGSTREAM_CRASH_AT": point, "PGSTREAM_CRASH_AFTER": str(rng.randint(1, 4))}
        with path.open("a") as f:
            f.write("".join(line + "\n" for line in lines[i * chunk : (i + 1) * chunk]))
        before = batches()
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
        kills += 1
    assert kills == 6
    with path.open("a") as f:
        f.write("".join(line + "\n" for line in lines[6 * chunk :]))
    done = subprocess.run(
        [sys.executable, "-m", "pgstream", "run", "app:app", "--stop-when-idle", "--dsn", pg_dsn],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    recs = {"0": list(file_records(lines))}
    refs: dict[str, Reference] = {
        "upd": reference(recs, size=60, grace=15),
        "fin": reference(recs, size=60, grace=15, final=True),
        "hop": reference(recs, size=60, every=20, grace=15),
    }
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for t in tables:
            ref = refs[t]
            assert ref.late
            assert _windows(conn, t) == ref.windows, t
            assert _late(conn, t) == sorted(("0", off, s) for _, off, s in ref.late), t
        dead = conn.execute('SELECT partition, "offset" FROM pgstream.dead_letters').fetchall()
        assert sorted(dead) == sorted(refs["upd"].dead)
        assert len(set(dead)) == len(dead)
    checked = subprocess.run(
        [sys.executable, "-m", "pgstream", "verify", "app:app", "--dsn", pg_dsn],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

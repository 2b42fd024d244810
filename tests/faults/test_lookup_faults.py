"""Lookups under faults, with real ``pgstream run`` processes (tests/faults/apps/lookupapp.py).

* kill -9 before a batch's COMMIT, the lookup table changes, a restart finishes the job: every
  record lands exactly once; batches committed before the crash keep the rows they read, the
  replayed batch and later ones read the table as of their own commit.
* transient errors retry the batch transaction: the lookup runs again, nothing doubles.
* a sink rejecting an enriched row: bisection sets aside exactly the records whose looked-up
  row the sink refuses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from harness import APPS

N = 200
USERS = 8
MISSING = {5}


def country(user: int) -> str:
    return f"c{user % 3}"


def setup(dsn: str, path: Path, *, tiers: dict[int, int] | None = None) -> None:
    import lookupapp

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(lookupapp.DDL)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users VALUES (%s, %s, %s)",
                [
                    (u, country(u), (tiers or {}).get(u, u))
                    for u in range(USERS)
                    if u not in MISSING
                ],
            )
    path.write_bytes(
        b"".join(orjson.dumps({"id": i, "user_id": i % USERS}) + b"\n" for i in range(N))
    )


def run(dsn: str, path: Path, tmp: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    environ.update(
        PYTHONPATH=os.pathsep.join([str(APPS), environ.get("PYTHONPATH", "")]),
        LOOKUPAPP_FILE=str(path),
        **env,
    )
    cmd = [sys.executable, "-m", "pgstream", "run", "lookupapp:app", "--dsn", dsn,
           "--stop-when-idle"]
    return subprocess.run(cmd, env=environ, cwd=tmp, capture_output=True, timeout=120,
                          check=False)


def rows(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def verify_clean(dsn: str, path: Path, tmp: Path) -> str:
    environ = {**os.environ, "PYTHONPATH": str(APPS), "LOOKUPAPP_FILE": str(path)}
    res = subprocess.run(
        [sys.executable, "-m", "pgstream", "verify", "lookupapp:app", "--dsn", dsn],
        env=environ, cwd=tmp, capture_output=True, timeout=120, check=False,
    )
    out = (res.stdout + res.stderr).decode()
    assert res.returncode == 0, out
    return out


def test_kill_before_commit_then_table_changes(pg_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "orders.jsonl"
    setup(pg_dsn, path)
    crashed = run(pg_dsn, path, tmp_path, PGSTREAM_CRASH_AT="before_commit",
                  PGSTREAM_CRASH_AFTER="3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-2000:]
    (cut,) = rows(pg_dsn, "SELECT committed_offset FROM pgstream.partitions")[0]
    assert rows(pg_dsn, "SELECT count(*) FROM pgstream.batches") == [(2,)]
    verify_clean(pg_dsn, path, tmp_path)

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE users SET country = 'moved' WHERE id = 1")
    done = run(pg_dsn, path, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]

    got = rows(pg_dsn, "SELECT order_id, user_id, country, _offset FROM facts")
    assert sorted(r[0] for r in got) == list(range(N))  # each record exactly once
    seen: Counter[str] = Counter()
    for oid, user, c, offset in got:
        want = None if user in MISSING else country(user)
        if user == 1 and offset >= cut:
            want = "moved"  # read by a batch committed after the change (the replay included)
        assert c == want, (oid, user, c, offset, cut)
        seen[c or "?"] += 1
    assert dict(rows(pg_dsn, "SELECT country, n FROM per_country")) == dict(seen)
    assert any(c == "moved" for _, _, c, _ in got) and any(c == "c1" for _, _, c, _ in got)
    out = verify_clean(pg_dsn, path, tmp_path)
    assert "lookup('users')" in out


def test_transient_errors_retry_the_lookup_without_doubling(pg_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "orders.jsonl"
    setup(pg_dsn, path)
    done = run(pg_dsn, path, tmp_path, PGSTREAM_INJECT_ERRORS="40001,40P01",
               PGSTREAM_INJECT_RATE="0.5", LOOKUPAPP_MISSING="drop")
    assert done.returncode == 0, done.stdout[-2000:]
    assert b"retrying" in done.stdout + done.stderr
    got = sorted(rows(pg_dsn, "SELECT order_id, country FROM facts"))
    want = [(i, country(i % USERS)) for i in range(N) if i % USERS not in MISSING]
    assert got == want
    counts = Counter(c for _, c in want)
    assert dict(rows(pg_dsn, "SELECT country, n FROM per_country")) == dict(counts)


@pytest.mark.parametrize("missing", ["null", "dead_letter"])
def test_sink_rejection_of_an_enriched_row_is_bisected(
    pg_dsn: str, tmp_path: Path, missing: str
) -> None:
    path = tmp_path / "orders.jsonl"
    setup(pg_dsn, path, tiers={2: 950})  # facts.tier < 900: user 2's rows are refused
    done = run(pg_dsn, path, tmp_path, LOOKUPAPP_MISSING=missing)
    assert done.returncode == 0, done.stdout[-2000:]
    bad = {i for i in range(N) if i % USERS == 2}
    gone = {i for i in range(N) if i % USERS in MISSING} if missing == "dead_letter" else set()
    got = sorted(r[0] for r in rows(pg_dsn, "SELECT order_id FROM facts"))
    assert got == sorted(set(range(N)) - bad - gone)
    dead = rows(pg_dsn, "SELECT operator, error FROM pgstream.dead_letters")
    assert Counter(op for op, _ in dead)["sink"] == len(bad)
    assert len(dead) == len(bad) + len(gone)
    verify_clean(pg_dsn, path, tmp_path)

"""``pgstream rebuild`` (issue 10 part 5), through the real command line and real processes.

The app reads a file of events into an append sink (``facts``), a count/sum aggregate
(``totals``), a fold (``folds``) and a tumbling window with a grace (``minutes``: watermark
state). Version 2 of the code prices facts differently and sets aside events with
``id % 13 == 5`` (dead letters); it is recorded with ``run --accept-changes``. References
are computed from the input file with ``json`` (not pgstream): after a rebuild every table
holds exactly what version 2 makes of the whole input, and ``pgstream verify`` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

APP = """
import os
import pgstream as ps

V2 = os.environ.get("REBUILDAPP_V2") == "1"
app = ps.App("rebuildjob", batch_size=int(os.environ.get("REBUILDAPP_BATCH", "50")),
             max_interval=0.05, poll_interval=0.02)
events = app.stream("events", ps.FileSource(os.environ["REBUILDAPP_FILE"]))


def fact_v1(r):
    return {"id": r["id"], "user_id": r["user"], "cents": r["amount"] * 100}


def fact_v2(r):
    if r["id"] % 13 == 5:
        raise ValueError(f"cannot price event {r['id']}")
    return {"id": r["id"], "user_id": r["user"], "cents": r["amount"] * 100 + 1}


def count(s, r):
    return {"n": s["n"] + 1, "last": r["id"]}


valid = events.map(fact_v2 if V2 else fact_v1)
valid.to_table("facts")
valid.key_by("user_id").aggregate(n=ps.count(), total=ps.sum("cents")).to_table("totals")
valid.key_by("user_id").fold({"n": 0, "last": None}, count).to_table("folds")
events.key_by("user", name="user_id").window(ps.tumbling(seconds=60), time="ts", grace=600) \\
    .aggregate(n=ps.count()).to_table("minutes")
if os.environ.get("REBUILDAPP_TOPS") == "1":
    events.key_by("user", name="user_id").aggregate(top=ps.max("amount")).to_table("tops")
if os.environ.get("REBUILDAPP_HANDLER") == "1":
    @app.batch(events)
    def audit(batch):
        batch.execute("INSERT INTO audit (n) VALUES (%s)", [len(batch.records)])
"""

DDL = """
CREATE TABLE facts (id bigint NOT NULL, user_id bigint, cents bigint,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX facts_pos ON facts (_source, _partition, _offset, _seq);
CREATE TABLE totals (user_id bigint PRIMARY KEY, n bigint NOT NULL, total numeric);
CREATE TABLE folds (user_id bigint PRIMARY KEY, n bigint, last bigint);
CREATE TABLE minutes (user_id bigint NOT NULL, window_start timestamptz NOT NULL,
    n bigint NOT NULL, PRIMARY KEY (user_id, window_start));
CREATE TABLE tops (user_id bigint PRIMARY KEY, top bigint);
CREATE TABLE audit (n bigint);
"""

USERS = 7
T0 = 1_700_000_000


def _line(i: int) -> bytes:
    amount = (i * 37) % 89 - 20
    return b'{"id": %d, "user": %d, "amount": %d, "ts": %d}\n' % (i, i % USERS, amount, T0 + i * 7)


def _setup(
    tmp_path: Path, conn: psycopg.Connection[Any], n: int, **extra: str
) -> tuple[dict[str, str], bytes]:
    (tmp_path / "rebuildapp.py").write_text(APP)
    data = b"".join(_line(i) for i in range(n))
    (tmp_path / "events.jsonl").write_bytes(data)
    conn.execute(DDL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(REBUILDAPP_FILE=str(tmp_path / "events.jsonl"), PYTHONUNBUFFERED="1", **extra)
    return env, data


def _append(tmp_path: Path, start: int, n: int) -> bytes:
    with (tmp_path / "events.jsonl").open("ab") as f:
        f.write(b"".join(_line(i) for i in range(start, start + n)))
    return (tmp_path / "events.jsonl").read_bytes()


def _cli(
    tmp_path: Path, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pgstream", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _run(tmp_path: Path, env: dict[str, str], dsn: str, *more: str) -> None:
    _cli(tmp_path, env, "run", "rebuildapp:app", "--dsn", dsn, "--stop-when-idle", *more)


def _rebuild(
    tmp_path: Path, env: dict[str, str], dsn: str, *more: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return _cli(tmp_path, env, "rebuild", "rebuildapp:app", "--dsn", dsn, *more, check=check)


def _verify_clean(tmp_path: Path, env: dict[str, str], dsn: str) -> None:
    done = _cli(tmp_path, env, "verify", "rebuildapp:app", "--dsn", dsn, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


Tables = dict[str, Any]


def _reference(data: bytes, v2: bool) -> Tables:
    """Every table's content as version 1 or 2 of the app makes it of ``data``."""
    facts: Counter[Any] = Counter()
    totals: dict[int, tuple[int, int]] = {}
    folds: dict[int, tuple[int, int]] = {}
    minutes: Counter[Any] = Counter()
    tops: dict[int, int] = {}
    pos = 0
    for line in data.splitlines(keepends=True):
        off, r = pos, json.loads(line)
        pos += len(line)
        u = r["user"]
        start = datetime.fromtimestamp(r["ts"] - r["ts"] % 60, timezone.utc)
        if v2 and r["id"] % 13 == 5:
            continue  # a dead letter: no effect anywhere
        minutes[(u, start)] += 1
        tops[u] = max(tops.get(u, r["amount"]), r["amount"])
        cents = r["amount"] * 100 + (1 if v2 else 0)
        facts[(r["id"], u, cents, "events", "0", off, 0)] += 1
        n, t = totals.get(u, (0, 0))
        totals[u] = (n + 1, t + cents)
        folds[u] = (folds.get(u, (0, 0))[0] + 1, r["id"])
    return {"facts": facts, "totals": totals, "folds": folds, "minutes": dict(minutes),
            "tops": tops}  # fmt: skip


def _tables(conn: psycopg.Connection[Any]) -> Tables:
    q = conn.execute
    return {
        "facts": Counter(
            tuple(r)
            for r in q("SELECT id, user_id, cents, _source, _partition, _offset, _seq FROM facts")
        ),
        "totals": {int(u): (int(n), int(t)) for u, n, t in q("SELECT * FROM totals")},
        "folds": {int(u): (int(n), int(last)) for u, n, last in q("SELECT * FROM folds")},
        "minutes": {(int(u), w): int(n) for u, w, n in q("SELECT * FROM minutes")},
        "tops": {int(u): int(t) for u, t in q("SELECT * FROM tops")},
    }


CORE = ("facts", "totals", "folds", "minutes")


def _assert_tables(
    conn: psycopg.Connection[Any], want: Tables, names: tuple[str, ...] = CORE
) -> None:
    got = _tables(conn)
    for name in names:
        assert got[name] == want[name], f"{name} differs from the reference"


def _dead_offsets(conn: psycopg.Connection[Any]) -> list[int]:
    return [
        int(r[0]) for r in conn.execute('SELECT "offset" FROM pgstream.dead_letters ORDER BY 1')
    ]


def _failing(data: bytes) -> list[int]:
    out, pos = [], 0
    for line in data.splitlines(keepends=True):
        if json.loads(line)["id"] % 13 == 5:
            out.append(pos)
        pos += len(line)
    return out


def _shadow_rows(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pgstream.partitions WHERE job LIKE '%~rebuild')"
        " + (SELECT count(*) FROM pgstream.jobs WHERE job LIKE '%~rebuild')"
        " + (SELECT count(*) FROM pg_class WHERE relname LIKE '%\\_\\_rebuild'"
        "    OR relname LIKE '%\\_\\_old')"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_rebuild_after_a_logic_change_gives_the_new_code_s_outputs(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 600)
    _run(tmp_path, env, pg_dsn)
    _assert_tables(pg_conn, _reference(data, v2=False))
    v2 = {**env, "REBUILDAPP_V2": "1"}
    # today's code is not the job's plan: refused, naming --accept-changes
    refused = _rebuild(tmp_path, v2, pg_dsn, "--yes", check=False)
    assert refused.returncode != 0 and "--accept-changes" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    # version 2 is recorded and runs on new input: the tables now mix both versions
    data = _append(tmp_path, 600, 300)
    _run(tmp_path, v2, pg_dsn, "--accept-changes")
    mixed = _tables(pg_conn)
    assert mixed["facts"] != _reference(data, v2=True)["facts"]
    # a dry run says what it would do and changes nothing
    dry = _rebuild(tmp_path, v2, pg_dsn).stdout
    assert "dry run" in dry and "rebuild sink facts" in dry and "stream events" in dry, dry
    assert f"live committed offset {len(data)}" in dry, dry
    assert _tables(pg_conn) == mixed and _shadow_rows(pg_conn) == 0
    # the rebuild: every table is what version 2 makes of the whole input
    out = _rebuild(tmp_path, v2, pg_dsn, "--yes")
    assert "swapped in" in out.stdout, out.stdout + out.stderr
    _assert_tables(pg_conn, _reference(data, v2=True))
    assert _dead_offsets(pg_conn) == _failing(data)
    assert _shadow_rows(pg_conn) == 0
    _verify_clean(tmp_path, v2, pg_dsn)
    # the job goes on from the same offsets with the moved state
    data = _append(tmp_path, 900, 200)
    _run(tmp_path, v2, pg_dsn)
    _assert_tables(pg_conn, _reference(data, v2=True))
    _verify_clean(tmp_path, v2, pg_dsn)

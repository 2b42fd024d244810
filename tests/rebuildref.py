"""The app, tables and references of the ``pgstream rebuild`` tests (integration and faults).

The app reads events (a file, or with ``REBUILDAPP_SOURCE=table`` the table ``events``) into
an append sink (``facts``), a count/sum aggregate (``totals``), a fold (``folds``) and a
tumbling window with a grace (``minutes``: watermark state). Version 2 of the code
(``REBUILDAPP_V2=1``) prices facts differently and sets aside events with ``id % 13 == 5``
(dead letters). References are computed from the input with ``json`` / SQL, not pgstream.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from proctools import cli_env, run_cli

APP = """
import os
import pgstream as ps

V2 = os.environ.get("REBUILDAPP_V2") == "1"
app = ps.App("rebuildjob", batch_size=int(os.environ.get("REBUILDAPP_BATCH", "50")),
             max_interval=0.05, poll_interval=0.02)
if os.environ.get("REBUILDAPP_SOURCE") == "table":
    events = app.stream("events", ps.TableSource("public.events", offset_column="id"))
else:
    events = app.stream("events", ps.FileSource(os.environ["REBUILDAPP_FILE"]))


def norm(r):
    return {"id": r["id"], "user": r["user_id"], "amount": r["amount"], "ts": r["ts"]}


def fact_v1(r):
    return {"id": r["id"], "user_id": r["user"], "cents": r["amount"] * 100}


def fact_v2(r):
    if r["id"] % 13 == 5:
        raise ValueError(f"cannot price event {r['id']}")
    return {"id": r["id"], "user_id": r["user"], "cents": r["amount"] * 100 + 1}


def count(s, r):
    return {"n": s["n"] + 1, "last": r["id"]}


events = events.map(norm)
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
CREATE TABLE events (id bigserial PRIMARY KEY, user_id int NOT NULL, amount int NOT NULL,
    ts bigint GENERATED ALWAYS AS (1700000000 + id * 7) STORED);
"""

USERS = 7
T0 = 1_700_000_000
CORE = ("facts", "totals", "folds", "minutes")

Records = list[tuple[int, dict[str, Any]]]
Tables = dict[str, Any]


def line(i: int) -> bytes:
    """Event ``i`` as a line of the input file."""
    amount = (i * 37) % 89 - 20
    return b'{"id": %d, "user_id": %d, "amount": %d, "ts": %d}\n' % (
        i, i % USERS, amount, T0 + i * 7,
    )  # fmt: skip


def setup(
    tmp_path: Path, conn: psycopg.Connection[Any], n: int, **extra: str
) -> tuple[dict[str, str], bytes]:
    """Write the app and ``n`` events, create the tables; the environment for the CLI."""
    (tmp_path / "rebuildapp.py").write_text(APP)
    data = b"".join(line(i) for i in range(n))
    (tmp_path / "events.jsonl").write_bytes(data)
    conn.execute(DDL)
    env = cli_env(REBUILDAPP_FILE=str(tmp_path / "events.jsonl"), PYTHONUNBUFFERED="1", **extra)
    return env, data


def append(tmp_path: Path, start: int, n: int) -> bytes:
    """Append events ``start .. start+n-1`` to the file; its whole content."""
    with (tmp_path / "events.jsonl").open("ab") as f:
        f.write(b"".join(line(i) for i in range(start, start + n)))
    return (tmp_path / "events.jsonl").read_bytes()


def file_records(data: bytes) -> Records:
    """(offset, event) of every line of the file."""
    out, pos = [], 0
    for raw in data.splitlines(keepends=True):
        out.append((pos, json.loads(raw)))
        pos += len(raw)
    return out


def table_records(conn: psycopg.Connection[Any], below: int | None = None) -> Records:
    """(id, event) of the table's committed rows (ids below ``below``)."""
    rows = conn.execute(
        "SELECT id, user_id, amount, ts FROM events WHERE id < %s ORDER BY id",
        [below if below is not None else 2**62],
    )
    return [(int(i), {"id": i, "user_id": u, "amount": a, "ts": t}) for i, u, a, t in rows]


def reference(records: Records, v2: bool) -> Tables:
    """Every table's content as version 1 or 2 of the app makes it of ``records``."""
    facts: Counter[Any] = Counter()
    totals: dict[int, tuple[int, int]] = {}
    folds: dict[int, tuple[int, int]] = {}
    minutes: Counter[Any] = Counter()
    tops: dict[int, int] = {}
    for off, r in records:
        if v2 and r["id"] % 13 == 5:
            continue  # a dead letter: no effect anywhere
        u = r["user_id"]
        minutes[(u, datetime.fromtimestamp(r["ts"] - r["ts"] % 60, timezone.utc))] += 1
        tops[u] = max(tops.get(u, r["amount"]), r["amount"])
        cents = r["amount"] * 100 + (1 if v2 else 0)
        facts[(r["id"], u, cents, "events", "0", off, 0)] += 1
        n, t = totals.get(u, (0, 0))
        totals[u] = (n + 1, t + cents)
        folds[u] = (folds.get(u, (0, 0))[0] + 1, r["id"])
    return {"facts": facts, "totals": totals, "folds": folds, "minutes": dict(minutes),
            "tops": tops}  # fmt: skip


def failing(records: Records) -> list[int]:
    """The offsets version 2 sets aside."""
    return [off for off, r in records if r["id"] % 13 == 5]


def tables(conn: psycopg.Connection[Any]) -> Tables:
    """Every sink table's content, shaped like :func:`reference`."""
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


def assert_tables(
    conn: psycopg.Connection[Any], want: Tables, names: tuple[str, ...] = CORE
) -> None:
    """The tables ``names`` hold exactly ``want``'s rows."""
    got = tables(conn)
    for name in names:
        if name == "facts":
            lost, extra = want[name] - got[name], got[name] - want[name]
            assert not lost and not extra, f"facts: lost {list(lost)[:3]}, extra {list(extra)[:3]}"
        assert got[name] == want[name], f"{name} differs from the reference"


def dead_offsets(conn: psycopg.Connection[Any]) -> list[int]:
    """The live job's dead letters' offsets."""
    return [
        int(r[0])
        for r in conn.execute(
            "SELECT \"offset\" FROM pgstream.dead_letters WHERE job = 'rebuildjob' ORDER BY 1"
        )
    ]


def leftovers(conn: psycopg.Connection[Any]) -> int:
    """Rows and tables a rebuild leaves behind (0 after a swap)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pgstream.partitions WHERE job LIKE '%~rebuild')"
        " + (SELECT count(*) FROM pgstream.jobs WHERE job LIKE '%~rebuild')"
        " + (SELECT count(*) FROM pgstream.state WHERE job LIKE '%~rebuild')"
        " + (SELECT count(*) FROM pg_class WHERE relname LIKE '%\\_\\_rebuild'"
        "    OR relname LIKE '%\\_\\_old')"
    ).fetchone()
    assert row is not None
    return int(row[0])


def cli(
    tmp_path: Path, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``python -m pgstream ARGS`` in ``tmp_path``."""
    done = run_cli(*args, cwd=tmp_path, env=env, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def run(tmp_path: Path, env: dict[str, str], dsn: str, *more: str) -> None:
    """Run the app until it is idle."""
    cli(tmp_path, env, "run", "rebuildapp:app", "--dsn", dsn, "--stop-when-idle", *more)


def rebuild(
    tmp_path: Path, env: dict[str, str], dsn: str, *more: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``pgstream rebuild rebuildapp:app MORE``."""
    return cli(tmp_path, env, "rebuild", "rebuildapp:app", "--dsn", dsn, *more, check=check)


def verify_clean(tmp_path: Path, env: dict[str, str], dsn: str) -> None:
    """``pgstream verify`` exits 0."""
    done = cli(tmp_path, env, "verify", "rebuildapp:app", "--dsn", dsn, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

"""``pgstream rewind`` (issue 10 part 4), through the real command line and real processes.

The app appends a fact per event (``facts``) and keeps count/sum/avg per user (``totals``);
events with ``id % 7 == 3`` raise (dead letters). References are computed from the input
file with ``json`` (not pgstream). Rewinding to a batch boundary must leave exactly the
effects of the records before it; running again must give the outputs of an uninterrupted
run, and ``pgstream verify`` is clean.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import broker_jobs as bj
import psycopg
import pytest

APP = """
import os
import time
import pgstream as ps

SLOW = float(os.environ.get("REWINDAPP_SLOW", "0"))
FIXED = os.environ.get("REWINDAPP_FIXED") == "1"
app = ps.App("rewindjob", batch_size=int(os.environ.get("REWINDAPP_BATCH", "50")),
             max_interval=0.05, poll_interval=0.02)
events = app.stream("events", ps.FileSource(os.environ["REWINDAPP_FILE"]))


def fact(r):
    if r["id"] % 7 == 3 and not FIXED:
        raise ValueError(f"cannot price event {r['id']}")
    if SLOW:
        time.sleep(SLOW)
    return {"id": r["id"], "user_id": r["user"], "cents": r["amount"] * 100}


events.map(fact).to_table("facts")
events.key_by("user", name="user_id").aggregate(
    n=ps.count(), total=ps.sum("amount"), mean=ps.avg("amount")
).to_table("totals")
EXTRA = os.environ.get("REWINDAPP_EXTRA")
if EXTRA == "max":
    events.key_by("user", name="user_id").aggregate(top=ps.max("amount")).to_table("tops")
if EXTRA == "fold":
    events.key_by("user", name="user_id").fold(
        {"n": 0}, lambda s, r: {"n": s["n"] + 1}).to_table("folds")
"""

DDL = """
CREATE TABLE facts (id bigint NOT NULL, user_id bigint, cents bigint,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX facts_pos ON facts (_source, _partition, _offset, _seq);
CREATE TABLE totals (user_id bigint PRIMARY KEY, n bigint NOT NULL, total numeric,
    mean numeric, _mean_sum numeric, _mean_count bigint);
CREATE TABLE tops (user_id bigint PRIMARY KEY, top bigint);
CREATE TABLE folds (user_id bigint PRIMARY KEY, n bigint);
"""

USERS = 11
Totals = dict[int, tuple[int, int, int, int]]


def _line(i: int) -> bytes:
    return b'{"id": %d, "user": %d, "amount": %d}\n' % (i, i % USERS, (i * 37) % 89 - 20)


def _setup(
    tmp_path: Path, conn: psycopg.Connection[Any], n: int, **extra: str
) -> tuple[dict[str, str], bytes]:
    (tmp_path / "rewindapp.py").write_text(APP)
    data = b"".join(_line(i) for i in range(n))
    (tmp_path / "events.jsonl").write_bytes(data)
    conn.execute(DDL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(REWINDAPP_FILE=str(tmp_path / "events.jsonl"), PYTHONUNBUFFERED="1", **extra)
    return env, data


def _cli(
    tmp_path: Path, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pgstream", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _run(tmp_path: Path, env: dict[str, str], dsn: str) -> None:
    _cli(tmp_path, env, "run", "rewindapp:app", "--dsn", dsn, "--stop-when-idle")


def _rewind(
    tmp_path: Path, env: dict[str, str], dsn: str, to: int, *more: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    args = ["rewind", "rewindapp:app", "--dsn", dsn, "--source", "events", "--to", str(to)]
    return _cli(tmp_path, env, *args, *more, check=check)


def _reference(
    data: bytes, below: int | None = None, bad: bool = True
) -> tuple[Counter[Any], Totals]:
    """facts rows and (n, total, mean_sum, mean_count) per user of the records at offsets
    below ``below`` (None: all), except (``bad``) those failing ``id % 7 == 3``."""
    facts: Counter[Any] = Counter()
    totals: Totals = {}
    pos = 0
    for line in data.splitlines(keepends=True):
        off, r = pos, json.loads(line)
        pos += len(line)
        if (below is not None and off >= below) or (bad and r["id"] % 7 == 3):
            continue
        facts[(r["id"], r["user"], r["amount"] * 100, "events", "0", off, 0)] += 1
        n, t, _, _ = totals.get(r["user"], (0, 0, 0, 0))
        totals[r["user"]] = (n + 1, t + r["amount"], t + r["amount"], n + 1)
    return facts, totals


def _sinks(conn: psycopg.Connection[Any]) -> tuple[Counter[Any], Totals]:
    facts = Counter(
        tuple(r)
        for r in conn.execute(
            "SELECT id, user_id, cents, _source, _partition, _offset, _seq FROM facts"
        )
    )
    totals: Totals = {}
    for u, n, t, mean, ms, mc in conn.execute(
        "SELECT user_id, n, total, mean, _mean_sum, _mean_count FROM totals"
    ):
        assert Decimal(mean).quantize(Decimal("0.0001")) == (Decimal(ms) / Decimal(mc)).quantize(
            Decimal("0.0001")
        )
        totals[int(u)] = (int(n), int(t), int(ms), int(mc))
    return facts, totals


def _assert_sinks(
    conn: psycopg.Connection[Any], data: bytes, below: int | None = None, bad: bool = True
) -> None:
    want_facts, want_totals = _reference(data, below, bad)
    got_facts, got_totals = _sinks(conn)
    lost, extra = want_facts - got_facts, got_facts - want_facts
    assert not lost and not extra, f"lost {list(lost)[:3]}, extra {list(extra)[:3]}"
    assert got_totals == want_totals


def _dead_offsets(conn: psycopg.Connection[Any]) -> list[int]:
    return [
        int(r[0]) for r in conn.execute('SELECT "offset" FROM pgstream.dead_letters ORDER BY 1')
    ]


def _failing(data: bytes, below: int | None = None) -> list[int]:
    out, pos = [], 0
    for line in data.splitlines(keepends=True):
        if json.loads(line)["id"] % 7 == 3 and (below is None or pos < below):
            out.append(pos)
        pos += len(line)
    return out


def _boundaries(conn: psycopg.Connection[Any]) -> list[int]:
    return [int(r[0]) for r in conn.execute("SELECT start_offset FROM pgstream.batches ORDER BY 1")]


def _snapshot(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """Everything a rewind changes."""
    return (
        _sinks(conn),
        _dead_offsets(conn),
        _boundaries(conn),
        conn.execute(
            "SELECT committed_offset, epoch, batches, records FROM pgstream.partitions"
        ).fetchall(),
    )


def _verify_clean(tmp_path: Path, env: dict[str, str], dsn: str) -> None:
    done = _cli(tmp_path, env, "verify", "rewindapp:app", "--dsn", dsn, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rewind_then_run_again_equals_an_uninterrupted_run(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 600)
    _run(tmp_path, env, pg_dsn)
    _assert_sinks(pg_conn, data)
    bounds = _boundaries(pg_conn)
    to = bounds[len(bounds) // 2]
    before = _snapshot(pg_conn)
    # a dry run says what it would do and changes nothing
    dry = _rewind(tmp_path, env, pg_dsn, to).stdout
    assert "dry run" in dry and f"back to {to}" in dry, dry
    assert "append sink facts:" in dry and "aggregate sink totals:" in dry, dry
    assert _snapshot(pg_conn) == before
    # an offset inside a batch is refused with the boundaries around it
    inside = _rewind(tmp_path, env, pg_dsn, to + 1, "--yes", check=False)
    assert inside.returncode != 0 and f"--to {to}" in inside.stderr, inside.stderr
    assert "Traceback" not in inside.stderr
    assert _snapshot(pg_conn) == before
    # the rewind: exactly the effects of the records before `to` are left
    out = _rewind(tmp_path, env, pg_dsn, to, "--yes").stdout
    assert "dry run" not in out
    _assert_sinks(pg_conn, data, below=to)
    assert _dead_offsets(pg_conn) == _failing(data, below=to)
    assert _boundaries(pg_conn) == [b for b in bounds if b < to]
    row = pg_conn.execute("SELECT committed_offset, epoch FROM pgstream.partitions").fetchone()
    assert row is not None and row[0] == to and row[1] > before[3][0][1]
    _verify_clean(tmp_path, env, pg_dsn)
    # run again: the outputs of an uninterrupted run
    _run(tmp_path, env, pg_dsn)
    _assert_sinks(pg_conn, data)
    assert _dead_offsets(pg_conn) == _failing(data)
    _verify_clean(tmp_path, env, pg_dsn)
    # back to the very first offset, and again
    _rewind(tmp_path, env, pg_dsn, 0, "--yes")
    _assert_sinks(pg_conn, data, below=0)
    assert pg_conn.execute("SELECT count(*) FROM totals").fetchone() == (0,)  # no key left
    _verify_clean(tmp_path, env, pg_dsn)
    _run(tmp_path, env, pg_dsn)
    _assert_sinks(pg_conn, data)
    _verify_clean(tmp_path, env, pg_dsn)


def test_rewind_retracts_what_a_redrive_wrote(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 400)
    _run(tmp_path, env, pg_dsn)
    fixed = {**env, "REWINDAPP_FIXED": "1"}
    _cli(tmp_path, fixed, "dlq", "redrive", "rewindapp:app", "--dsn", pg_dsn, "--yes")
    _assert_sinks(pg_conn, data, bad=False)
    to = _boundaries(pg_conn)[3]
    _rewind(tmp_path, fixed, pg_dsn, to, "--yes")
    # the redriven records beyond `to` are retracted too; those before it stay redriven
    _assert_sinks(pg_conn, data, below=to, bad=False)
    assert _dead_offsets(pg_conn) == _failing(data, below=to)
    _run(tmp_path, fixed, pg_dsn)
    _assert_sinks(pg_conn, data, bad=False)
    assert _dead_offsets(pg_conn) == _failing(data, below=to)
    _verify_clean(tmp_path, fixed, pg_dsn)


@pytest.mark.parametrize(
    ("extra", "named"),
    [("max", "aggregate sink 'tops' has max"), ("fold", "fold sink 'folds'")],
)
def test_refuses_what_it_cannot_retract_exactly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], extra: str, named: str
) -> None:
    env, _ = _setup(tmp_path, pg_conn, 200, REWINDAPP_EXTRA=extra)
    _run(tmp_path, env, pg_dsn)
    before = _snapshot(pg_conn)
    to = _boundaries(pg_conn)[1]
    done = _rewind(tmp_path, env, pg_dsn, to, "--yes", check=False)
    assert done.returncode != 0
    assert named in done.stderr and "rebuild" in done.stderr, done.stderr
    assert "pgstream rebuild MODULE:APP" in done.stderr and "Traceback" not in done.stderr
    assert _snapshot(pg_conn) == before


def test_a_kill_in_the_middle_of_a_rewind_changes_nothing(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 300)
    _run(tmp_path, env, pg_dsn)
    before = _snapshot(pg_conn)
    to = _boundaries(pg_conn)[2]
    crash = {**env, "PGSTREAM_CRASH_AT": "rewind_before_commit"}
    done = _cli(tmp_path, crash, "rewind", "rewindapp:app", "--dsn", pg_dsn, "--source",
                "events", "--to", str(to), "--yes", check=False)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert _snapshot(pg_conn) == before
    _verify_clean(tmp_path, env, pg_dsn)
    _rewind(tmp_path, env, pg_dsn, to, "--yes")
    _assert_sinks(pg_conn, data, below=to)
    _run(tmp_path, env, pg_dsn)
    _assert_sinks(pg_conn, data)
    _verify_clean(tmp_path, env, pg_dsn)
    # at the committed offset: nothing to do; beyond it: refused
    before = _snapshot(pg_conn)
    assert "nothing to rewind" in _rewind(tmp_path, env, pg_dsn, len(data), "--yes").stdout
    beyond = _rewind(tmp_path, env, pg_dsn, len(data) + 1, "--yes", check=False)
    assert beyond.returncode != 0 and "rewind only goes back" in beyond.stderr, beyond.stderr
    assert _snapshot(pg_conn) == before


def _committed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT committed_offset FROM pgstream.partitions").fetchone()
    return -1 if row is None or row[0] is None else int(row[0])


def test_rewind_while_a_worker_runs_fences_it_and_ends_exact(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 1500, REWINDAPP_SLOW="0.002", REWINDAPP_BATCH="40")
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgstream", "run", "rewindapp:app", "--dsn", pg_dsn],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _committed(pg_conn) < len(data) // 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.poll() is None
        bounds = _boundaries(pg_conn)
        to = bounds[len(bounds) // 3]
        out = _rewind(tmp_path, env, pg_dsn, to, "--yes").stdout
        assert "fenced" in out, out  # the live worker held the lease
        assert _committed(pg_conn) < len(data)  # it was rewound mid-run
        # the worker takes the partition back and finishes from `to`
        deadline = time.monotonic() + 90
        while _committed(pg_conn) < len(data) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _committed(pg_conn) == len(data)
        assert worker.poll() is None  # fenced, not dead
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    _assert_sinks(pg_conn, data)
    assert _dead_offsets(pg_conn) == _failing(data)
    _verify_clean(tmp_path, env, pg_dsn)


def test_a_source_that_no_longer_holds_the_range_is_refused(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 300)
    _run(tmp_path, env, pg_dsn)
    before = _snapshot(pg_conn)
    bounds = _boundaries(pg_conn)
    to = bounds[2]
    # the input lost its tail (like a broker whose retention dropped the range)
    (tmp_path / "events.jsonl").write_bytes(data[: bounds[4]])
    done = _rewind(tmp_path, env, pg_dsn, to, "--yes", check=False)
    assert done.returncode != 0, done.stdout
    assert f"re-read [{to}, {len(data)})" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _snapshot(pg_conn) == before


def test_one_partition_of_several(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, _ = _setup(tmp_path, pg_conn, 10)
    (tmp_path / "in").mkdir()
    for name, lo in (("a", 0), ("b", 1000)):
        (tmp_path / "in" / f"{name}.jsonl").write_bytes(
            b"".join(_line(i) for i in range(lo, lo + 300))
        )
    env["REWINDAPP_FILE"] = str(tmp_path / "in" / "*.jsonl")
    _run(tmp_path, env, pg_dsn)
    uninterrupted = _sinks(pg_conn)
    parts = [r[0] for r in pg_conn.execute("SELECT partition FROM pgstream.partitions ORDER BY 1")]
    assert len(parts) == 2
    a = parts[0]
    to = [
        int(r[0])
        for r in pg_conn.execute(
            "SELECT start_offset FROM pgstream.batches WHERE partition = %s ORDER BY 1", [a]
        )
    ][2]
    done = _rewind(tmp_path, env, pg_dsn, to, "--yes", check=False)
    assert done.returncode != 0 and "--partition P" in done.stderr, done.stderr
    _rewind(tmp_path, env, pg_dsn, to, "--partition", a, "--yes")
    facts, _ = _sinks(pg_conn)
    kept = Counter({k: v for k, v in uninterrupted[0].items() if k[4] != a or k[5] < to})
    assert facts == kept  # only partition a's rows at offsets >= to are gone
    offsets = dict(pg_conn.execute("SELECT partition, committed_offset FROM pgstream.partitions"))
    assert offsets[a] == to and offsets[parts[1]] > to
    _run(tmp_path, env, pg_dsn)
    assert _sinks(pg_conn) == uninterrupted
    _verify_clean(tmp_path, env, pg_dsn)


def test_a_held_partition_row_makes_it_refuse_after_waiting(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, _ = _setup(tmp_path, pg_conn, 200)
    _run(tmp_path, env, pg_dsn)
    before = _snapshot(pg_conn)
    to = _boundaries(pg_conn)[1]
    with psycopg.connect(pg_dsn) as other:  # like a batch in flight: the row stays locked
        other.execute("SELECT 1 FROM pgstream.partitions FOR UPDATE")
        start = time.monotonic()
        done = _rewind(tmp_path, env, pg_dsn, to, "--wait", "0.5", "--yes", check=False)
        assert done.returncode != 0 and "held the partition row" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and time.monotonic() - start < 30
        other.rollback()
    assert _snapshot(pg_conn) == before
    _rewind(tmp_path, env, pg_dsn, to, "--wait", "0.5", "--yes")


TABLE_APP = """
import pgstream as ps

app = ps.App("rewindtable", batch_size=40, max_interval=0.05, poll_interval=0.02)
orders = app.stream("orders", ps.TableSource("public.orders", offset_column="id"))
orders.map(lambda o: {"id": o["id"], "cents": int(o["amount"] * 100)}).to_table("order_facts")
orders.key_by("user_id").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("user_totals")
"""

_TABLE_TOTALS = """
SELECT count(*) FILTER (WHERE t.n = o.n AND t.total = o.s),
       count(*)
  FROM user_totals t
  FULL JOIN (SELECT user_id, count(*) AS n, sum(amount) AS s FROM orders
              WHERE id < %(below)s GROUP BY 1) o USING (user_id)
"""


def _assert_table_sinks(conn: psycopg.Connection[Any], below: int) -> None:
    facts = conn.execute(
        "SELECT count(*) FILTER (WHERE f.cents = (o.amount * 100)::bigint AND o.id < %(b)s),"
        " count(*) FROM order_facts f LEFT JOIN orders o ON o.id = f._offset",
        {"b": below},
    ).fetchone()
    want = conn.execute("SELECT count(*) FROM orders WHERE id < %s", [below]).fetchone()
    assert facts is not None and want is not None and facts == (want[0], want[0])
    matching, rows = conn.execute(_TABLE_TOTALS, {"below": below}).fetchone() or (0, 0)
    assert matching == rows and rows > 0


def test_a_table_source_with_numeric_amounts(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """Re-read from the table (numerics as Decimals, as the worker wrote them; the aggregate
    may have been written by a pushed-down statement): exact to the cent."""
    (tmp_path / "tableapp.py").write_text(TABLE_APP)
    pg_conn.execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL,"
        " amount numeric(10, 2) NOT NULL);"
        "CREATE TABLE order_facts (id bigint, cents bigint, _source text NOT NULL,"
        " _partition text NOT NULL, _offset bigint NOT NULL, _seq integer NOT NULL DEFAULT 0,"
        " PRIMARY KEY (_source, _partition, _offset, _seq));"
        "CREATE TABLE user_totals (user_id bigint PRIMARY KEY, n bigint NOT NULL, total numeric);"
        "INSERT INTO orders (user_id, amount) SELECT i % 7, ((i * 37) % 1000) / 100.0"
        " FROM generate_series(1, 400) AS i"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    run = ["run", "tableapp:app", "--dsn", pg_dsn, "--stop-when-idle"]
    _cli(tmp_path, env, *run)
    _assert_table_sinks(pg_conn, 10**9)
    first = _cli(tmp_path, env, "verify", "tableapp:app", "--dsn", pg_dsn, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    to = _boundaries(pg_conn)[4]
    rewind = ["rewind", "tableapp:app", "--dsn", pg_dsn, "--source", "orders"]
    _cli(tmp_path, env, *rewind, "--to", str(to), "--yes")
    _assert_table_sinks(pg_conn, to)
    _cli(tmp_path, env, *run)
    _assert_table_sinks(pg_conn, 10**9)
    done = _cli(tmp_path, env, "verify", "tableapp:app", "--dsn", pg_dsn, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- --to-time ---------------------------------------------------------------------------------


def _rewind_time(
    tmp_path: Path, env: dict[str, str], dsn: str, when: str, *more: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    args = ["rewind", "rewindapp:app", "--dsn", dsn, "--source", "events", "--to-time", when]
    return _cli(tmp_path, env, *args, *more, check=check)


def test_to_time_on_a_file_undoes_what_was_committed_since(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """A file's records carry no time: TIME is read against the ledger's commit times."""
    env, data = _setup(tmp_path, pg_conn, 600)
    first = b"".join(_line(i) for i in range(300))
    (tmp_path / "events.jsonl").write_bytes(first)
    _run(tmp_path, env, pg_dsn)
    row = pg_conn.execute("SELECT now()").fetchone()
    assert row is not None
    when: datetime = row[0]
    (tmp_path / "events.jsonl").write_bytes(data)  # the file grew
    _run(tmp_path, env, pg_dsn)
    _assert_sinks(pg_conn, data)
    before = _snapshot(pg_conn)
    dry = _rewind_time(tmp_path, env, pg_dsn, when.isoformat()).stdout
    assert "has no record times" in dry and "read against the ledger" in dry, dry
    assert f"starts at offset {len(first)}" in dry and f"batch boundary {len(first)}" in dry
    assert "dry run" in dry and f"back to {len(first)}" in dry, dry
    assert _snapshot(pg_conn) == before
    out = _rewind_time(tmp_path, env, pg_dsn, when.isoformat(), "--yes").stdout
    assert f"back to {len(first)}" in out and "dry run" not in out, out
    _assert_sinks(pg_conn, data, below=len(first))
    assert _dead_offsets(pg_conn) == _failing(data, below=len(first))
    _verify_clean(tmp_path, env, pg_dsn)
    _run(tmp_path, env, pg_dsn)
    _assert_sinks(pg_conn, data)
    _verify_clean(tmp_path, env, pg_dsn)
    # a time ago, against the database clock: all of it was committed in the last hour
    for ago in ("-1h", "60 minutes"):
        assert "batch boundary 0 " in _rewind_time(tmp_path, env, pg_dsn, ago).stdout
    after = _snapshot(pg_conn)
    later = (when + timedelta(hours=1)).isoformat()
    nothing = _rewind_time(tmp_path, env, pg_dsn, later, "--yes").stdout
    assert "nothing was committed" in nothing and "nothing to rewind" in nothing, nothing
    naive = _rewind_time(tmp_path, env, pg_dsn, "2026-12-07T21:30:00", "--yes", check=False)
    assert naive.returncode == 2 and "has no timezone" in naive.stderr, naive.stderr
    garbage = _rewind_time(tmp_path, env, pg_dsn, "last tuesday", "--yes", check=False)
    assert garbage.returncode == 2 and "neither an ISO-8601 time" in garbage.stderr
    both = _rewind(tmp_path, env, pg_dsn, 0, "--to-time", "-1h", "--yes", check=False)
    assert both.returncode == 2 and "exactly one of --to" in both.stderr, both.stderr
    for done in (naive, garbage, both):
        assert "Traceback" not in done.stderr
    assert _snapshot(pg_conn) == after


REDIS_URL = "redis://127.0.0.1:6379"


@pytest.fixture
def redis_key() -> Iterator[str]:
    redis = pytest.importorskip("redis")
    key = "pgstest:rewind:" + uuid.uuid4().hex[:10]
    yield key
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(key)
    client.close()


def _broker_rewind(tmp_path: Path, dsn: str, when: datetime, *more: str) -> str:
    args = ["rewind", "brokerapp:app", "--source", "events", "--to-time", when.isoformat()]
    done = bj.pgstream(tmp_path, dsn, *args, *more)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _boundary(conn: psycopg.Connection[Any], at: int) -> int:
    """The start of the committed batch holding offset ``at``."""
    ledger = bj.ledger(conn)
    holding = [s for s, e in ledger if s <= at < e]
    assert len(holding) == 1, (at, ledger)
    return holding[0]


def _rewound_and_rerun(
    tmp_path: Path, dsn: str, conn: psycopg.Connection[Any], ids: list[int], bad: int
) -> None:
    done = bj.run_idle(tmp_path, dsn, {"BATCH": "50"})
    assert done.returncode == 0, done.stderr
    bj.check_sinks(conn, ids, bad=bad)
    verified = bj.pgstream(tmp_path, dsn, "verify", "brokerapp:app")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_to_time_on_redis_maps_through_the_entry_ids(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], redis_key: str
) -> None:
    """Entry ``i`` has id ``<base + i ms>-0``; a time maps to the first id at or after it."""
    import redis

    from pgstream.sources.redis_stream import id_to_offset

    base = 1_796_679_000_000  # 2026-12-07T21:30:00Z in epoch milliseconds
    client = redis.Redis.from_url(REDIS_URL)
    pipe = client.pipeline(transaction=False)
    for i, data in enumerate(bj.payloads(0, 600, bad_every=50)):
        pipe.xadd(redis_key, {"data": data}, id=f"{base + i}-0")
    pipe.execute()
    client.close()
    bj.setup(tmp_path, pg_conn, f"ps.RedisStreamSource({redis_key!r}, url={REDIS_URL!r})")
    ids = bj.valid_ids(0, 600, 50)
    _rewound_and_rerun(tmp_path, pg_dsn, pg_conn, ids, bad=12)
    # 275.5 ms after the first entry: the first entry at or after it is entry 276
    when = datetime.fromtimestamp(base // 1000, timezone.utc) + timedelta(microseconds=275_500)
    x = id_to_offset(f"{base + 276}-0")
    y = _boundary(pg_conn, x)
    kept = sum(1 for i in range(600) if id_to_offset(f"{base + i}-0") < y)
    assert 0 < kept <= 276
    dry = _broker_rewind(tmp_path, pg_dsn, when)
    assert f"maps to offset {x} (redis stream {redis_key})" in dry, dry
    assert f"batch boundary {y} (records from {y} on" in dry and "dry run" in dry, dry
    assert bj.committed(pg_conn) == id_to_offset(f"{base + 599}-0") + 1
    _broker_rewind(tmp_path, pg_dsn, when, "--yes")
    assert bj.committed(pg_conn) == y
    bj.check_sinks(pg_conn, [i for i in ids if i < kept], bad=sum(i % 50 == 3 for i in range(kept)))
    _rewound_and_rerun(tmp_path, pg_dsn, pg_conn, ids, bad=12)
    # an hour before the first entry: back to the partition's start
    out = _broker_rewind(tmp_path, pg_dsn, when - timedelta(hours=1), "--yes")
    assert "batch boundary 0 " in out, out
    bj.check_sinks(pg_conn, [], bad=0)
    _rewound_and_rerun(tmp_path, pg_dsn, pg_conn, ids, bad=12)
    # after the last entry: nothing to rewind
    out = _broker_rewind(tmp_path, pg_dsn, when + timedelta(seconds=1), "--yes")
    assert "at or after the committed offset" in out and "nothing to rewind" in out, out


NATS_SERVER = "nats://127.0.0.1:4222"


async def _nats(name: str, action: str, payloads: list[bytes] | None = None) -> None:
    import nats

    nc = await nats.connect(NATS_SERVER)
    try:
        js = nc.jetstream()
        if action == "add":
            await js.add_stream(name=name, subjects=[f"{name}.>"])
        elif action == "delete":
            await js.delete_stream(name)
        else:
            for data in payloads or []:
                await js.publish(f"{name}.e", data)
    finally:
        await nc.close()


@pytest.fixture
def nats_stream() -> Iterator[str]:
    pytest.importorskip("nats")
    name = "PGSTEST_RW_" + uuid.uuid4().hex[:8].upper()
    asyncio.run(_nats(name, "add"))
    yield name
    asyncio.run(_nats(name, "delete"))


def test_to_time_on_nats_maps_through_the_storage_times(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], nats_stream: str
) -> None:
    asyncio.run(_nats(nats_stream, "publish", bj.payloads(0, 300, bad_every=50)))  # seq 1..300
    time.sleep(0.1)
    when = datetime.now(timezone.utc)  # the server's clock is this machine's
    time.sleep(0.1)
    asyncio.run(_nats(nats_stream, "publish", bj.payloads(300, 300, bad_every=50)))  # 301..600
    bj.setup(tmp_path, pg_conn, f"ps.NatsSource({nats_stream!r}, servers={NATS_SERVER!r})")
    ids = bj.valid_ids(0, 600, 50)
    _rewound_and_rerun(tmp_path, pg_dsn, pg_conn, ids, bad=12)
    y = _boundary(pg_conn, 301)
    dry = _broker_rewind(tmp_path, pg_dsn, when)
    assert f"maps to offset 301 (nats stream {nats_stream})" in dry, dry
    assert f"batch boundary {y} (records" in dry, dry
    _broker_rewind(tmp_path, pg_dsn, when, "--yes")
    assert bj.committed(pg_conn) == y
    kept = y - 1  # sequence s holds event s - 1
    bj.check_sinks(pg_conn, [i for i in ids if i < kept], bad=sum(i % 50 == 3 for i in range(kept)))
    _rewound_and_rerun(tmp_path, pg_dsn, pg_conn, ids, bad=12)

"""A sink that rejects every record stops the job with one clear error (issue 11 item 10).

A schema mismatch (a text value into a bigint column, a NOT NULL column the map never fills)
makes every record bad. Bisection used to turn each record into its own batch and dead letter
(20,000 batches in 35 s, exit 0). Now the worker tries the rejected batch's first
``max_sink_rejections`` records alone (rolled back) and, when each is rejected for the same
reason, stops: nothing of the batch committed, no dead letters, the offset before it. Genuine
bad rows among good ones are still bisected and dead-lettered, one by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from netfaults import assert_ledger_tiles, verify_clean

import pgstream as ps
from pgstream.errors import ConfigError, SinkRejectedError
from pgstream.runtime.worker import Worker

DDL = """
CREATE TABLE facts (id bigint NOT NULL, user_id bigint, region text NOT NULL,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX facts_pos ON facts (_source, _partition, _offset, _seq);
CREATE TABLE per_user (user_id bigint PRIMARY KEY, n bigint NOT NULL);
"""

APP = """\
import os
import pgstream as ps

app = ps.App("mismatch")
orders = app.stream("orders", ps.FileSource(os.environ["ORDERS"]))
orders.map(lambda o: {"id": o["id"], "user_id": o["user"], "region": "eu"}).to_table("facts")
"""


def line(i: int, user: Any) -> bytes:
    return json.dumps({"id": i, "user": user}).encode() + b"\n"


def write(path: Path, users: list[Any], first_id: int = 0, mode: str = "wb") -> None:
    with open(path, mode) as f:
        for i, user in enumerate(users, first_id):
            f.write(line(i, user))


def offsets(path: Path) -> list[int]:
    data, out, pos = path.read_bytes(), [], 0
    for raw in data.splitlines(keepends=True):
        out.append(pos)
        pos += len(raw)
    return out


def committed(conn: psycopg.Connection[Any], job: str) -> int | None:
    row = conn.execute(
        "SELECT committed_offset FROM pgstream.partitions WHERE job = %s", [job]
    ).fetchone()
    return None if row is None else row[0]


def dead_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgstream.dead_letters").fetchone()
    assert row is not None
    return int(row[0])


def run_worker(app: ps.App, dsn: str) -> Any:
    return Worker(app, dsn, stop_when_idle=True, install_signal_handlers=False).run()


def facts_app(path: Path, map_fn: Any, **kw: Any) -> ps.App:
    app = ps.App("rejects", max_interval=0.05, poll_interval=0.02, **kw)
    app.stream("orders", ps.FileSource(path)).map(map_fn).to_table("facts")
    return app


def to_fact(o: dict[str, Any]) -> dict[str, Any]:
    return {"id": o["id"], "user_id": o["user"], "region": "eu"}


def test_cli_schema_mismatch_stops_fast_with_one_clear_error(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """1,000 good orders commit; then 20,000 whose user is text for a bigint column: one
    error naming the table, the database's error and the fix; nothing more committed."""
    pg_conn.execute(DDL)
    (tmp_path / "app.py").write_text(APP)
    orders = tmp_path / "orders.jsonl"
    write(orders, list(range(1_000)))
    env = {**os.environ, "ORDERS": str(orders)}
    cmd = [sys.executable, "-m", "pgstream", "run", "app:app", "--dsn", pg_dsn]
    cmd.append("--stop-when-idle")
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = orders.stat().st_size
    assert committed(pg_conn, "mismatch") == before

    write(orders, [f"user-{i}" for i in range(20_000)], first_id=1_000, mode="ab")
    started = time.monotonic()
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    assert res.returncode == 1, res.stderr
    # the run's start line, then the error and its hint
    start, *lines = res.stderr.strip().splitlines()
    assert 'INFO pgstream.progress: job "mismatch": 1 stream' in start, res.stderr
    assert len(lines) == 2 and "Traceback" not in res.stderr, res.stderr
    assert lines[0] == (
        "error: sink table public.facts rejects every record of orders/0: 8 records in a row "
        f"from offset {before}, each written alone, were rejected for the same reason: "
        'invalid input syntax for type bigint: "user-0" (SQLSTATE 22P02, column user_id); '
        "nothing from that offset on was committed"
    )
    assert lines[1].startswith(
        "  hint: the values the pipeline writes for column user_id do not fit its type: "
    )
    assert f"it resumes at offset {before}" in lines[1]
    assert "max_sink_rejections=0" in lines[1]
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert committed(pg_conn, "mismatch") == before
    assert dead_count(pg_conn) == 0
    assert pg_conn.execute("SELECT count(*) FROM facts").fetchone() == (1_000,)


def test_a_producer_change_mid_batch_commits_the_good_part_and_stops_at_the_first_bad(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """One batch holds 1,003 good records then 3,000 bad ones: the good ones commit (through
    bisection), the worker stops exactly at the first bad one, nothing dead-lettered."""
    pg_conn.execute(DDL)
    orders = tmp_path / "orders.jsonl"
    write(orders, [*range(1_003), *(f"user-{i}" for i in range(3_000))])
    app = facts_app(orders, to_fact)
    with pytest.raises(SinkRejectedError) as err:
        run_worker(app, pg_dsn)
    first_bad = offsets(orders)[1_003]
    assert f" in a row from offset {first_bad}, " in err.value.message
    assert committed(pg_conn, "rejects") == first_bad
    assert dead_count(pg_conn) == 0
    assert pg_conn.execute("SELECT count(*), max(id) FROM facts").fetchone() == (1_003, 1_002)
    assert_ledger_tiles(pg_conn, "rejects", {("orders", "0"): 0})


@pytest.mark.parametrize("sink", ["append", "aggregate"])
def test_not_null_column_never_filled_names_the_column_and_the_fix(
    sink: str, tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(DDL)
    pg_conn.execute("ALTER TABLE per_user ADD COLUMN region text NOT NULL")
    orders = tmp_path / "orders.jsonl"
    write(orders, [i % 7 for i in range(300)])
    app = ps.App("rejects", max_interval=0.05, poll_interval=0.02)
    stream = app.stream("orders", ps.FileSource(orders))
    if sink == "append":
        stream.map(lambda o: {"id": o["id"], "user_id": o["user"]}).to_table("facts")
        table = "facts"
    else:
        stream.key_by("user", name="user_id").aggregate(n=ps.count()).to_table("per_user")
        table = "per_user"
    with pytest.raises(SinkRejectedError) as err:
        run_worker(app, pg_dsn)
    assert err.value.message.startswith(f"sink table public.{table} rejects every record")
    assert "(SQLSTATE 23502, column region)" in err.value.message
    assert err.value.hint is not None
    assert err.value.hint.startswith(
        "the pipeline writes no value (or null) for NOT NULL column region: set it in your map"
    )
    assert committed(pg_conn, "rejects") in (None, 0)
    assert dead_count(pg_conn) == 0


def test_bad_rows_among_good_ones_are_still_dead_lettered(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """A lone bad row, and a run of bad rows shorter than max_sink_rejections (the same
    reason each), go to the dead letters as before; everything else is written."""
    pg_conn.execute(DDL)
    orders = tmp_path / "orders.jsonl"
    users: list[Any] = list(range(2_000))
    bad = [150, 1_200, 1_201, 1_202, 1_203, 1_204, 1_205, 1_206, 1_999]  # 7 in a row at 1,200
    for i in bad:
        users[i] = f"user-{i}"
    write(orders, users)
    app = facts_app(orders, to_fact, batch_size=500)
    summary = run_worker(app, pg_dsn)
    at = offsets(orders)
    assert summary.dead_letters == len(bad)
    rows = pg_conn.execute(
        'SELECT "offset", operator, error FROM pgstream.dead_letters ORDER BY 1'
    ).fetchall()
    assert [r[0] for r in rows] == [at[i] for i in bad]
    assert all(r[1] == "sink" and "invalid input syntax for type bigint" in r[2] for r in rows)
    assert pg_conn.execute("SELECT count(*) FROM facts").fetchone() == (2_000 - len(bad),)
    assert committed(pg_conn, "rejects") == orders.stat().st_size
    verify_clean(app, pg_dsn)


def test_max_sink_rejections_zero_dead_letters_every_record(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(DDL)
    orders = tmp_path / "orders.jsonl"
    write(orders, [f"user-{i}" for i in range(40)])
    summary = run_worker(facts_app(orders, to_fact, max_sink_rejections=0), pg_dsn)
    assert summary.dead_letters == 40
    assert committed(pg_conn, "rejects") == orders.stat().st_size


def test_max_sink_rejections_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_sink_rejections must be 0"):
        ps.App("x", max_sink_rejections=1)
    assert ps.App("x").settings.max_sink_rejections == 8


def test_one_record_batches_stop_after_max_sink_rejections_in_a_row(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """A quiet stream commits one record per batch, so no batch holds records to compare:
    the 8th rejection in a row for one reason stops it (the 7 before are dead letters)."""
    pg_conn.execute(DDL)
    orders = tmp_path / "orders.jsonl"
    write(orders, [f"user-{i}" for i in range(20)])
    with pytest.raises(SinkRejectedError) as err:
        run_worker(facts_app(orders, to_fact, batch_size=1), pg_dsn)
    at = offsets(orders)
    assert err.value.message.startswith(
        f"sink table public.facts rejects every record of orders/0: 8 records in a row up to "
        f"offset {at[7]}, each written alone, were rejected for the same reason: "
    )
    assert "the 7 before it are in pgstream.dead_letters" in err.value.message
    assert dead_count(pg_conn) == 7
    assert committed(pg_conn, "rejects") == at[7]


def test_one_record_batches_with_good_records_between_bad_ones_never_stop(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(DDL)
    orders = tmp_path / "orders.jsonl"
    write(orders, [i if i % 2 else f"user-{i}" for i in range(40)])
    summary = run_worker(facts_app(orders, to_fact, batch_size=1), pg_dsn)
    assert summary.dead_letters == 20
    assert committed(pg_conn, "rejects") == orders.stat().st_size

"""``pgstream job list|rename|reset|retire`` and orphan streams, as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
from proctools import run_cli
from psycopg.types.json import Jsonb

FILE_APP = """
import os
import pgstream as ps

app = ps.App({job!r}, batch_size=100, max_interval=0.0)
{streams}
"""

ORDERS_STREAM = """
orders = app.stream({name!r}, ps.FileSource(os.environ["ORDERS"]))
orders.map(lambda o: {{"id": o["id"]}}).to_table("ids")
orders.key_by("user").aggregate(n=ps.count()).to_table("per_user")
"""

CLICKS_STREAM = """
clicks = app.stream("clicks", ps.FileSource(os.environ["CLICKS"]))
clicks.map(lambda c: {"id": c["id"]}).to_table("click_ids")
"""

FILE_DDL = """
CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint, _seq int,
    UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE click_ids (id bigint, _source text, _partition text, _offset bigint, _seq int,
    UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE per_user ("user" int PRIMARY KEY, n bigint);
"""


def pgstream(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does."""
    return run_cli(*args, cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def job_cli(
    tmp: Path, dsn: str, env: dict[str, str] | None, *args: str
) -> subprocess.CompletedProcess[str]:
    """``pgstream job ARGS --dsn DSN`` in ``tmp``."""
    return pgstream("job", *args, "--dsn", dsn, cwd=tmp, env=env)


def write_file_app(
    tmp: Path, module: str, *, job: str = "shop", orders: str = "orders", clicks: bool = False
) -> None:
    """A FileSource app in ``tmp/<module>.py``."""
    streams = ORDERS_STREAM.format(name=orders) + (CLICKS_STREAM if clicks else "")
    (tmp / f"{module}.py").write_text(textwrap.dedent(FILE_APP.format(job=job, streams=streams)))


def file_setup(tmp: Path, conn: psycopg.Connection[Any], n: int = 1000) -> dict[str, str]:
    """Input files and sink tables for the FileSource apps."""
    conn.execute(FILE_DDL)
    orders, clicks = tmp / "orders.jsonl", tmp / "clicks.jsonl"
    orders.write_text("".join(json.dumps({"id": i, "user": i % 10}) + "\n" for i in range(n)))
    clicks.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(n // 2)))
    return {"ORDERS": str(orders), "CLICKS": str(clicks)}


def run_idle(
    tmp: Path, target: str, dsn: str, env: dict[str, str], *extra: str, timeout: float = 120
) -> str:
    """``pgstream run TARGET --stop-when-idle [EXTRA]``; returns its stderr (asserts exit 0)."""
    done = pgstream(
        "run", target, "--dsn", dsn, "--stop-when-idle", *extra, cwd=tmp, env=env, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


# --- orphans: a stream removed from the code ------------------------------------------------


def test_removed_stream_does_not_block_stop_when_idle(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "both", clicks=True)
    write_file_app(tmp_path, "only_orders")
    run_idle(tmp_path, "both:app", pg_dsn, env)
    # clicks is gone from the code; its partition row stays until retired
    stderr = run_idle(tmp_path, "only_orders:app", pg_dsn, env, "--accept-changes", timeout=60)
    assert "'clicks'" in stderr and "pgstream job retire" in stderr, stderr
    assert pg_conn.execute("SELECT count(*) FROM ids").fetchone() == (1000,)
    # verify checks what the app still has and names the orphan it cannot check
    verified = pgstream("verify", "only_orders:app", "--dsn", pg_dsn, cwd=tmp_path, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "stream 'clicks' (partition 0) is no longer in the app" in verified.stdout


# --- rename: 20,000 orders from a table, exactly once across the rename ---------------------

TABLE_APP = """
import pgstream as ps

app = ps.App({job!r}, batch_size=1500, max_interval=0.0)
orders = app.stream({stream!r}, ps.TableSource("public.orders", offset_column="id"))
valid = orders.filter(lambda o: o["amount"] > 0)


def fact(o):
    if o["amount"] == 13:
        raise ValueError("thirteen")
    return {{"order_id": o["id"], "user_id": o["user_id"], "cents": o["amount"] * 100}}


valid.map(fact).to_table("order_facts")
valid.key_by("user_id").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("user_totals")
orders.key_by("user_id").fold(
    {{"n": 0, "last": 0}}, lambda s, o: {{"n": s["n"] + 1, "last": o["id"]}}
).to_table("user_last")
"""

TABLE_DDL = """
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int NOT NULL, amount int NOT NULL);
CREATE TABLE order_facts (order_id bigint, user_id int, cents bigint,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq int NOT NULL, UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE user_totals (user_id int PRIMARY KEY, n bigint NOT NULL, total bigint);
CREATE TABLE user_last (user_id int PRIMARY KEY, n bigint, last bigint);
"""


def write_table_app(tmp: Path, module: str, *, job: str = "shop", stream: str = "orders") -> None:
    (tmp / f"{module}.py").write_text(TABLE_APP.format(job=job, stream=stream))


def add_orders(conn: psycopg.Connection[Any], n: int, seed: int) -> None:
    """``n`` orders; amount 0 is filtered out, amount 13 is a dead letter."""
    rng = random.Random(seed)
    with conn.cursor().copy("COPY orders (user_id, amount) FROM STDIN") as copy:
        for _ in range(n):
            copy.write_row((rng.randrange(97), rng.choice([0, 13, *range(1, 50)])))


def assert_outputs_match_reference(conn: psycopg.Connection[Any]) -> None:
    """Every sink equals a recomputation from the orders table (each order counted once)."""
    orders = conn.execute("SELECT id, user_id, amount FROM orders ORDER BY id").fetchall()
    live = [o for o in orders if o[2] != 13]  # amount 13 fails: a dead letter, no effect
    facts = sorted((i, u, a * 100) for i, u, a in live if a > 0)
    got = conn.execute("SELECT order_id, user_id, cents FROM order_facts ORDER BY 1").fetchall()
    assert got == facts
    totals: dict[int, tuple[int, int]] = {}
    last: dict[int, tuple[int, int]] = {}
    for i, u, a in live:
        if a > 0:
            n, t = totals.get(u, (0, 0))
            totals[u] = (n + 1, t + a)
        last[u] = (last.get(u, (0, 0))[0] + 1, i)
    got_totals = {u: (n, t) for u, n, t in conn.execute("SELECT * FROM user_totals")}
    assert got_totals == totals
    assert {u: (n, i) for u, n, i in conn.execute("SELECT * FROM user_last")} == last
    dead = conn.execute("SELECT count(*) FROM pgstream.dead_letters").fetchone()
    assert dead == (sum(1 for o in orders if o[2] == 13),)


def test_stream_rename_continues_from_the_old_offsets(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(TABLE_DDL)
    add_orders(pg_conn, 20_000, seed=1)
    write_table_app(tmp_path, "shop_v1")
    run_idle(tmp_path, "shop_v1:app", pg_dsn, {})
    write_table_app(tmp_path, "shop_v2", stream="orders_v2")

    renamed = job_cli(
        tmp_path, pg_dsn, None, "rename", "shop_v2:app", "--stream", "orders=orders_v2"
    )
    assert renamed.returncode == 0, renamed.stderr
    facts = pg_conn.execute("SELECT count(*) FROM order_facts").fetchone()
    assert facts is not None
    out = renamed.stdout
    assert "stream 'orders' of job 'shop' renamed to 'orders_v2'" in out
    assert "1 partition row(s) at offsets 0=20001" in out
    assert f"append sink order_facts: {facts[0]} row(s) now have _source = 'orders_v2'" in out
    assert "1 fold state row" not in out and "fold state row(s) (orders_v2:fold:user_last)" in out
    assert pg_conn.execute(
        "SELECT DISTINCT source FROM pgstream.batches UNION SELECT DISTINCT source "
        "FROM pgstream.dead_letters UNION SELECT DISTINCT _source FROM order_facts"
    ).fetchall() == [("orders_v2",)]
    assert pg_conn.execute("SELECT DISTINCT operator FROM pgstream.state").fetchall() == [
        ("orders_v2:fold:user_last",)
    ]

    add_orders(pg_conn, 3_000, seed=2)
    stderr = run_idle(tmp_path, "shop_v2:app", pg_dsn, {})
    assert "shop: 3000 records" in stderr, stderr  # nothing re-read
    assert_outputs_match_reference(pg_conn)
    verified = pgstream("verify", "shop_v2:app", "--dsn", pg_dsn, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_job_and_stream_rename_together_move_plan_and_workers(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "v1", job="shop")
    write_file_app(tmp_path, "v2", job="shop2", orders="orders_v2")
    run_idle(tmp_path, "v1:app", pg_dsn, env)
    pg_conn.execute(
        "INSERT INTO pgstream.workers (job, worker, hostname, pid) VALUES ('shop', 'w', 'h', 1)"
    )
    # a start under the new name that read nothing: its plan and registration go away
    record_plan(pg_conn, "shop2", {"streams": {"orders_v2": {"source": "x"}}})
    pg_conn.execute(
        "INSERT INTO pgstream.partitions (job, source, partition) VALUES ('shop2', 'orders_v2', "
        "'0')"
    )
    before = pg_conn.execute(
        "SELECT committed_offset, epoch FROM pgstream.partitions WHERE job = 'shop'"
    ).fetchone()
    assert before is not None

    done = job_cli(
        tmp_path, pg_dsn, env,
        "rename", "v2:app", "--from-job", "shop", "--stream", "orders=orders_v2"
    )
    assert done.returncode == 0, done.stderr
    assert "job 'shop' renamed to 'shop2'" in done.stdout
    assert "1 worker row(s)" in done.stdout and "1 plan version(s)" in done.stdout
    assert "dropped the plan recorded for 'shop2' by a start that read nothing" in done.stdout
    assert "removed 1 partition row(s) of 'shop2' that had committed nothing" in done.stdout
    assert "stream 'orders' of job 'shop2' renamed to 'orders_v2'" in done.stdout
    assert pg_conn.execute(
        "SELECT job, source, committed_offset, epoch FROM pgstream.partitions"
    ).fetchall() == [("shop2", "orders_v2", before[0], before[1] + 2)]  # fenced twice
    assert pg_conn.execute("SELECT DISTINCT job FROM pgstream.workers").fetchall() == [("shop2",)]
    # the plan v1 recorded, rewritten to the new names (the run below needs no
    # --accept-changes: it equals the plan of the renamed code)
    rows = pg_conn.execute(
        "SELECT j.job, j.plan, j.fingerprint, v.plan, v.fingerprint FROM pgstream.jobs j "
        "JOIN pgstream.plan_versions v USING (job)"
    ).fetchall()
    assert len(rows) == 1
    job, renamed, fingerprint, version_plan, version_fingerprint = rows[0]
    assert job == "shop2" and renamed == version_plan and fingerprint == version_fingerprint
    assert list(renamed["streams"]) == ["orders_v2"]
    assert {sink["stream"] for sink in renamed["sinks"]} == {"orders_v2"}
    assert fingerprint == hashlib.sha256(
        orjson.dumps(renamed, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()

    with open(env["ORDERS"], "a") as f:
        f.write("".join(json.dumps({"id": i, "user": i % 10}) + "\n" for i in range(1000, 1200)))
    stderr = run_idle(tmp_path, "v2:app", pg_dsn, env)
    assert "shop2: 200 records" in stderr, stderr
    assert pg_conn.execute("SELECT count(*), count(DISTINCT id) FROM ids").fetchone() == (
        1200,
        1200,
    )
    assert pg_conn.execute("SELECT sum(n) FROM per_user").fetchone() == (1200,)
    verified = pgstream("verify", "v2:app", "--dsn", pg_dsn, cwd=tmp_path, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def record_plan(conn: psycopg.Connection[Any], job: str, plan: dict[str, Any]) -> None:
    """A jobs row (version 1) and its plan version, in the contract's format."""
    fingerprint = hashlib.sha256(orjson.dumps(plan, option=orjson.OPT_SORT_KEYS)).hexdigest()
    conn.execute(
        "INSERT INTO pgstream.jobs (job, version, fingerprint, plan) VALUES (%s, 1, %s, %s)",
        [job, fingerprint, Jsonb(plan)],
    )
    conn.execute(
        "INSERT INTO pgstream.plan_versions (job, version, fingerprint, plan, changes) "
        "VALUES (%s, 1, %s, %s, 'first plan')",
        [job, fingerprint, Jsonb(plan)],
    )


# --- refusals ------------------------------------------------------------------------------


def partitions(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT job, source, partition, committed_offset FROM pgstream.partitions ORDER BY 1, 2"
    ).fetchall()


def test_commands_refuse_while_a_worker_holds_the_lease(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "v1")
    write_file_app(tmp_path, "v2", orders="orders_v2")
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgstream", "run", "v1:app", "--dsn", pg_dsn],
        cwd=tmp_path,
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        size = Path(env["ORDERS"]).stat().st_size
        # caught up and leased: from here the offsets change only through the commands
        while pg_conn.execute(
            "SELECT count(*) FROM pgstream.partitions WHERE committed_offset = %s "
            "AND owner IS NOT NULL AND lease_expires_at > now()",
            [size],
        ).fetchone() != (1,):
            assert time.monotonic() < deadline and worker.poll() is None, "worker never claimed"
            time.sleep(0.2)
        before = partitions(pg_conn)
        for args in (
            ("rename", "v2:app", "--stream", "orders=orders_v2"),
            ("reset", "v1:app", "--stream", "orders", "--yes"),
            ("reset", "v1:app", "--stream", "orders"),
        ):
            refused = job_cli(tmp_path, pg_dsn, env, *args)
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert "a live worker holds the lease on orders/" in refused.stderr
            assert "stop the job's workers first" in refused.stderr
            assert "Traceback" not in refused.stderr
        assert partitions(pg_conn) == before
    finally:
        worker.terminate()
        assert worker.wait(timeout=60) == 0
    done = job_cli(tmp_path, pg_dsn, env, "rename", "v2:app", "--stream", "orders=orders_v2")
    assert done.returncode == 0, done.stderr
    assert [p[1] for p in partitions(pg_conn)] == ["orders_v2"]


def test_rename_refuses_names_that_do_not_fit(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "both", clicks=True)
    write_file_app(tmp_path, "v2", orders="orders_v2")
    run_idle(tmp_path, "both:app", pg_dsn, env)
    before = partitions(pg_conn)
    cases = [
        (("v2:app", "--stream", "orders=nope"), 2, "stream 'nope' is not in app 'shop'"),
        (("both:app", "--stream", "clicks=orders"), 2, "stream 'clicks' is still in app 'shop'"),
        (
            ("v2:app", "--stream", "ghost=orders_v2"),
            1,
            "stream 'ghost' of job 'shop' has no checkpoint: nothing to rename",
        ),
        (("v2:app", "--from-job", "ghost"), 1, "job 'ghost' has no checkpoint"),
        (("v2:app", "--from-job", "shop"), 2, "--from-job 'shop' is the app's own name"),
        (("v2:app",), 2, "nothing to rename"),
        (("v2:app", "--stream", "orders"), 2, "expected OLD=NEW"),
    ]
    for args, code, message in cases:
        done = job_cli(tmp_path, pg_dsn, env, "rename", *args)
        assert done.returncode == code, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert partitions(pg_conn) == before


def test_rename_refuses_a_new_name_with_a_checkpoint(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "v1")
    write_file_app(tmp_path, "v2", orders="orders_v2")
    run_idle(tmp_path, "v1:app", pg_dsn, env)
    # a start under the new name that committed nothing is no obstacle: its row goes away
    pg_conn.execute(
        "INSERT INTO pgstream.partitions (job, source, partition) VALUES ('shop', 'orders_v2', 'x')"
    )
    pg_conn.execute(
        "INSERT INTO pgstream.partitions (job, source, partition, committed_offset) "
        "VALUES ('shop', 'orders_v2', 'y', 10)"
    )
    before = partitions(pg_conn)
    refused = job_cli(tmp_path, pg_dsn, env, "rename", "v2:app", "--stream", "orders=orders_v2")
    assert refused.returncode == 1
    assert (
        "error: stream 'orders_v2' of job 'shop' already has a checkpoint (committed offsets "
        "of orders_v2)" in refused.stderr
    )
    assert "pgstream job reset MODULE:APP --stream orders_v2" in refused.stderr
    assert partitions(pg_conn) == before
    pg_conn.execute("DELETE FROM pgstream.partitions WHERE partition = 'y'")
    done = job_cli(tmp_path, pg_dsn, env, "rename", "v2:app", "--stream", "orders=orders_v2")
    assert done.returncode == 0, done.stderr
    assert "removed 1 partition row(s) of 'orders_v2' that had committed nothing" in done.stdout
    assert [p[1:3] for p in partitions(pg_conn)] == [("orders_v2", "0")]


# --- reset -----------------------------------------------------------------------------------


def ledger(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgstream.batches").fetchone()
    assert row is not None
    return int(row[0])


def test_reset_dry_run_then_reset_reads_the_stream_from_the_start(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    with open(env["ORDERS"], "a") as f:
        f.write("{broken\n")  # one dead letter
    write_file_app(tmp_path, "v1")
    run_idle(tmp_path, "v1:app", pg_dsn, env)
    before, batches = partitions(pg_conn), ledger(pg_conn)
    assert batches == 11

    dry = job_cli(tmp_path, pg_dsn, env, "reset", "v1:app", "--stream", "orders")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert "reset stream 'orders' of job 'shop': the next run reads it from the start" in out
    assert "1 partition(s) back to the start" in out and "11 ledger batch(es) deleted" in out
    assert "dead letters: 1 deleted" in out
    assert "append sink ids: 1000 row(s) kept" in out and "skipped as a duplicate" in out
    assert "aggregate sink per_user: rows are NOT retracted" in out
    assert out.rstrip().endswith("dry run: nothing was changed; run again with --yes to do it")
    assert partitions(pg_conn) == before and ledger(pg_conn) == batches

    done = job_cli(tmp_path, pg_dsn, env, "reset", "v1:app", "--stream", "orders", "--yes")
    assert done.returncode == 0, done.stderr
    assert "dry run" not in done.stdout
    assert "done: the next `pgstream run` reads 'orders' from the start" in done.stdout
    assert [p[3] for p in partitions(pg_conn)] == [None] and ledger(pg_conn) == 0
    assert pg_conn.execute("SELECT count(*) FROM pgstream.dead_letters").fetchone() == (0,)
    epoch = pg_conn.execute("SELECT epoch FROM pgstream.partitions").fetchone()

    stderr = run_idle(tmp_path, "v1:app", pg_dsn, env)
    assert "shop: 1001 records" in stderr  # read again from the start
    assert pg_conn.execute("SELECT count(*), count(DISTINCT id) FROM ids").fetchone() == (
        1000,
        1000,
    )  # re-read outputs were skipped as duplicates
    assert pg_conn.execute("SELECT sum(n) FROM per_user").fetchone() == (2000,)  # as announced
    assert pg_conn.execute("SELECT count(*) FROM pgstream.dead_letters").fetchone() == (1,)
    assert epoch is not None and pg_conn.execute(
        "SELECT epoch > %s FROM pgstream.partitions", [epoch[0]]
    ).fetchone() == (True,)


def test_reset_with_delete_outputs_writes_the_append_rows_again(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "v1", clicks=True)
    run_idle(tmp_path, "v1:app", pg_dsn, env)
    pg_conn.execute("UPDATE ids SET id = -1")  # what an older version of the code wrote
    done = job_cli(
        tmp_path, pg_dsn, env, "reset", "v1:app", "--stream", "orders", "--delete-outputs", "--yes"
    )
    assert done.returncode == 0, done.stderr
    assert "append sink ids: 1000 row(s) deleted; written again on re-read" in done.stdout
    assert pg_conn.execute("SELECT count(*) FROM ids").fetchone() == (0,)
    assert pg_conn.execute("SELECT count(*) FROM click_ids").fetchone() == (500,)
    assert [p[1] for p in partitions(pg_conn) if p[3] is not None] == ["clicks"]
    run_idle(tmp_path, "v1:app", pg_dsn, env)
    assert pg_conn.execute("SELECT count(DISTINCT id), min(id) FROM ids").fetchone() == (1000, 0)
    verified = pgstream("verify", "v1:app", "--dsn", pg_dsn, cwd=tmp_path, env=env)
    assert "lost" not in verified.stdout and "duplicate" not in verified.stdout, verified.stdout


def test_reset_refuses_a_stream_not_in_the_app(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "v1")
    done = job_cli(tmp_path, pg_dsn, env, "reset", "v1:app", "--stream", "clicks")
    assert done.returncode == 2
    assert "error: stream 'clicks' is not in app 'shop'" in done.stderr
    assert "pgstream job retire MODULE:APP --stream clicks --yes" in done.stderr
    nothing = job_cli(tmp_path, pg_dsn, env, "reset", "v1:app", "--stream", "orders", "--yes")
    assert nothing.returncode == 0
    assert "has no checkpoint: nothing to reset" in nothing.stdout


# --- retire --------------------------------------------------------------------------------


def test_retire_drops_a_removed_stream_and_keeps_its_outputs(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    with open(env["CLICKS"], "a") as f:
        f.write("{broken\n")
    write_file_app(tmp_path, "both", clicks=True)
    write_file_app(tmp_path, "only_orders")
    run_idle(tmp_path, "both:app", pg_dsn, env)
    pg_conn.execute(
        "INSERT INTO pgstream.state (job, operator, partition, key, value) VALUES "
        "('shop', 'clicks:fold:t', '0', 'k', '1'), ('shop', 'orders:fold:t', '0', 'k', '1')"
    )

    refused = job_cli(tmp_path, pg_dsn, env, "retire", "both:app", "--stream", "clicks")
    assert refused.returncode == 2
    assert "stream 'clicks' is still in app 'shop'; remove it from the code first" in (
        refused.stderr
    )

    before, batches = partitions(pg_conn), ledger(pg_conn)
    dry = job_cli(tmp_path, pg_dsn, env, "retire", "only_orders:app", "--stream", "clicks")
    assert dry.returncode == 0, dry.stderr
    assert "checkpoint: 1 partition row(s) deleted" in dry.stdout
    assert "fold state: 1 key(s) deleted (clicks:fold:t)" in dry.stdout
    assert "dead letters: 1 kept" in dry.stdout and "sink rows: kept" in dry.stdout
    assert dry.stdout.startswith("dry run: this is what --yes would do\n")
    assert "dry run: nothing was changed" in dry.stdout
    assert partitions(pg_conn) == before and ledger(pg_conn) == batches

    done = job_cli(
        tmp_path, pg_dsn, env, "retire", "only_orders:app", "--stream", "clicks", "--yes"
    )
    assert done.returncode == 0, done.stderr
    assert "done: stream 'clicks' is retired" in done.stdout
    assert [p[1] for p in partitions(pg_conn)] == ["orders"]
    assert pg_conn.execute("SELECT DISTINCT source FROM pgstream.batches").fetchall() == [
        ("orders",)
    ]
    assert pg_conn.execute("SELECT operator FROM pgstream.state").fetchall() == [("orders:fold:t",)]
    assert pg_conn.execute("SELECT count(*) FROM click_ids").fetchone() == (500,)
    assert pg_conn.execute(
        "SELECT count(*) FROM pgstream.dead_letters WHERE source = 'clicks'"
    ).fetchone() == (1,)
    stderr = run_idle(tmp_path, "only_orders:app", pg_dsn, env, "--accept-changes", timeout=60)
    assert "no longer in the app" not in stderr


# --- list ----------------------------------------------------------------------------------


def test_list_shows_jobs_offsets_plans_and_orphans(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "both", clicks=True)
    write_file_app(tmp_path, "other", job="legacy")
    write_file_app(tmp_path, "only_orders")
    run_idle(tmp_path, "both:app", pg_dsn, env)
    # a second job over the same tables, from before plans were recorded
    run_idle(tmp_path, "other:app", pg_dsn, env, "--accept-changes")
    pg_conn.execute("DELETE FROM pgstream.jobs WHERE job = 'legacy'")
    # clicks leaves the code of job shop: plan version 2, its partition row an orphan
    run_idle(tmp_path, "only_orders:app", pg_dsn, env, "--accept-changes")
    size = Path(env["ORDERS"]).stat().st_size

    listed = job_cli(tmp_path, pg_dsn, None, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    legacy, shop = json.loads(listed.stdout)
    assert legacy["job"] == "legacy" and legacy["plan_version"] is None
    assert [s["orphan"] for s in legacy["streams"]] == [None]  # no recorded plan to judge by
    assert shop["plan_version"] == 2 and "stream 'clicks'" in shop["last_change"]
    assert shop["orphan_streams"] == ["clicks"]
    by_name = {s["stream"]: s for s in shop["streams"]}
    assert by_name["orders"]["partitions"][0]["committed_offset"] == size
    assert by_name["orders"]["orphan"] is False

    text = job_cli(tmp_path, pg_dsn, None, "list")
    assert text.returncode == 0, text.stderr
    assert "job shop: plan version 2, last change" in text.stdout
    assert "job legacy: no recorded plan" in text.stdout
    assert f"partition 0: committed {size}, 1000 record(s)" in text.stdout
    assert "stream clicks: 1 partition(s), 0 dead letter(s)  ORPHAN" in text.stdout
    assert "pgstream job retire MODULE:APP --stream clicks --yes" in text.stdout


def test_recreated_table_names_the_reset_command_which_then_reads_it_anew(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute(TABLE_DDL)
    add_orders(pg_conn, 2_000, seed=3)
    write_table_app(tmp_path, "shop_v1")
    run_idle(tmp_path, "shop_v1:app", pg_dsn, {})
    pg_conn.execute(
        "DROP TABLE orders; CREATE TABLE orders (id bigserial PRIMARY KEY, "
        "user_id int NOT NULL, amount int NOT NULL)"
    )
    add_orders(pg_conn, 300, seed=4)
    failed = pgstream("run", "shop_v1:app", "--dsn", pg_dsn, "--stop-when-idle", cwd=tmp_path)
    assert failed.returncode == 1
    assert "offsets jumped" in failed.stderr
    assert "fix: pgstream job reset MODULE:APP --stream S --delete-outputs" in failed.stderr

    done = job_cli(
        tmp_path, pg_dsn, None,
        "reset", "shop_v1:app", "--stream", "orders", "--delete-outputs", "--yes"
    )
    assert done.returncode == 0, done.stderr
    pg_conn.execute("TRUNCATE user_totals, user_last")  # the dry run says: not retracted
    run_idle(tmp_path, "shop_v1:app", pg_dsn, {})
    assert_outputs_match_reference(pg_conn)


def test_commands_refuse_while_a_batch_holds_the_partition_row(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = file_setup(tmp_path, pg_conn)
    write_file_app(tmp_path, "v1")
    write_file_app(tmp_path, "only_clicks", orders="unused")
    run_idle(tmp_path, "v1:app", pg_dsn, env)
    with psycopg.connect(pg_dsn) as batch:  # what a frozen worker's open batch looks like
        batch.execute("SELECT 1 FROM pgstream.partitions FOR UPDATE").fetchall()
        for args in (
            ("reset", "v1:app", "--stream", "orders", "--yes"),
            ("retire", "only_clicks:app", "--stream", "orders", "--yes"),
        ):
            refused = job_cli(tmp_path, pg_dsn, env, *args)
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert "a batch in flight holds its partition rows" in refused.stderr
            assert "stop the job's workers first" in refused.stderr
    assert [p[3] is not None for p in partitions(pg_conn)] == [True]

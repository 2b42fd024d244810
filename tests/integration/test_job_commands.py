"""``pgstream job list|rename|reset|retire`` and orphan streams, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg

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
    return subprocess.run(
        [sys.executable, "-m", "pgstream", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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


def run_idle(tmp: Path, target: str, dsn: str, env: dict[str, str], timeout: float = 120) -> str:
    """``pgstream run TARGET --stop-when-idle``; returns its stderr (asserts exit 0)."""
    done = pgstream("run", target, "--dsn", dsn, "--stop-when-idle", cwd=tmp, env=env,
                    timeout=timeout)
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
    stderr = run_idle(tmp_path, "only_orders:app", pg_dsn, env, timeout=60)
    assert "'clicks'" in stderr and "pgstream job retire" in stderr, stderr
    assert pg_conn.execute("SELECT count(*) FROM ids").fetchone() == (1000,)

"""Leases: one owner per partition, fair sharing, fencing by epoch, clean release."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

import pgstream as ps
from pgstream.errors import LeaseLostError
from pgstream.runtime.leases import LeaseManager
from pgstream.runtime.worker import Worker


def _app(tmp_path: Path, streams: int, n: int) -> ps.App:
    app = ps.App("lease-test", batch_size=50, lease_seconds=5)
    for s in range(streams):
        path = tmp_path / f"s{s}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "s": s}) + "\n" for i in range(n)))
        app.stream(f"s{s}", ps.FileSource(path)).map(
            lambda r: {"id": r["id"], "s": r["s"]}
        ).to_table("out")
    return app


def _make_out(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE out (id bigint, s int, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )


def test_two_workers_share_partitions_and_never_overlap(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    _make_out(pg_conn)
    app = _app(tmp_path, streams=4, n=3000)
    workers = [
        Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False) for _ in range(2)
    ]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert pg_conn.execute("SELECT count(*), count(DISTINCT (s, id)) FROM out").fetchone() == (
        12000,
        12000,
    )
    # Each partition was committed under a single epoch by a single worker at a time:
    # the ledger has no overlapping ranges (the schema enforces it) and each batch's
    # worker held the lease for that epoch.
    rows = pg_conn.execute(
        "SELECT source, count(DISTINCT epoch), count(DISTINCT worker) FROM pgstream.batches "
        "GROUP BY source"
    ).fetchall()
    assert len(rows) == 4
    assert all(epochs == owners for _, epochs, owners in rows)
    # Leases were released on a clean stop.
    assert pg_conn.execute(
        "SELECT count(*) FROM pgstream.partitions WHERE owner IS NOT NULL"
    ).fetchone() == (0,)
    assert pg_conn.execute("SELECT count(*) FROM pgstream.workers").fetchone() == (0,)


def test_stale_epoch_cannot_commit(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    _make_out(pg_conn)
    app = _app(tmp_path, streams=1, n=200)
    old = Worker(app, pg_dsn, install_signal_handlers=False)
    old._start_up()  # prepare, check the plan, register the partitions
    old._maintain()
    task = old.tasks[("s0", "0")]
    assert task.poll() == 50

    # A second worker takes over: the old owner's session is alive, so only an expired
    # lease lets it in. Expire it by hand, as the clock would.
    pg_conn.execute("UPDATE pgstream.partitions SET lease_expires_at = now() - interval '1s'")
    thief = LeaseManager("lease-test", "thief", 5)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        lease = thief.claim(conn, "s0", "0")
    assert lease is not None and lease.epoch == task.lease.epoch + 1

    try:
        task.poll()
    except LeaseLostError:
        pass
    else:
        raise AssertionError("a stale epoch committed a batch")
    assert pg_conn.execute("SELECT count(*) FROM out").fetchone() == (50,)
    old.db.close()


def test_sigterm_style_stop_releases_and_resumes(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    _make_out(pg_conn)
    app = _app(tmp_path, streams=1, n=20000)
    app.settings = app.settings.with_overrides(batch_size=500)
    worker = Worker(app, pg_dsn, install_signal_handlers=False)
    t = threading.Thread(target=worker.run)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = pg_conn.execute("SELECT count(*) FROM out").fetchone()
        if row and row[0] > 0:
            break
        time.sleep(0.01)
    worker.stop()
    t.join(30)
    partial = pg_conn.execute("SELECT count(*) FROM out").fetchone()
    assert partial is not None and partial[0] > 0
    # Released at once: a new worker claims without waiting for the lease to expire.
    started = time.monotonic()
    Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    assert time.monotonic() - started < 4
    assert pg_conn.execute("SELECT count(*), count(DISTINCT id) FROM out").fetchone() == (
        20000,
        20000,
    )

"""Unknown COMMIT outcome (issue 3 part 3, README "Guarantees" 5), made deterministic by a proxy.

A TCP proxy between the worker and PostgreSQL fails the COMMIT of one checkpoint
transaction in each of the two ways a client cannot tell apart:

* ``drop_commit``: the COMMIT never reaches the server (the batch did **not** land);
* ``cut_reply``: the server commits, the reply is lost (the batch **did** land).

Either way the worker must not re-send the batch blindly: it reconnects, reads its partition
row and decides from ``committed_offset`` (log line "COMMIT outcome was unknown; the batch
landed" / "did not land"). The proxy counts checkpoint transactions: after a cut reply no
second transaction over the same range is even attempted; after a dropped COMMIT exactly one
retry is. Outputs equal the reference, the ledger tiles, ``verify`` is clean.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
from netfaults import (
    SINK_DDL,
    PgProxy,
    assert_exact,
    assert_ledger_tiles,
    expected_from,
    ledger,
    make_app,
    verify_clean,
    write_events,
)

from pgstream.runtime.leases import LeaseManager
from pgstream.runtime.worker import Worker

N = 6_000
BATCH = 500


@pytest.mark.parametrize(
    ("fault", "landed"), [("drop_commit", False), ("cut_reply", True)]
)
@pytest.mark.parametrize("skip", [0, 4])
def test_unknown_commit_outcome_is_resolved_from_the_partition_row(
    fault: Any,
    landed: bool,
    skip: int,
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg_conn.execute(SINK_DDL)
    path = tmp_path / "events.jsonl"
    write_events(path, 0, N)
    app = make_app("unknown", path, batch_size=BATCH)

    reads: list[tuple[int | None, int]] = []
    real_read = LeaseManager.read_partition

    def spy(self: LeaseManager, conn: Any, source: str, partition: str) -> tuple[int | None, int]:
        row = real_read(self, conn, source, partition)
        reads.append(row)
        return row

    monkeypatch.setattr(LeaseManager, "read_partition", spy)
    caplog.set_level(logging.INFO, logger="pgstream")

    with PgProxy.for_dsn(pg_dsn) as proxy:
        proxy.arm(fault, skip=skip)  # the (skip+1)-th checkpoint COMMIT
        worker = Worker(
            app, proxy.dsn(pg_dsn), stop_when_idle=True, install_signal_handlers=False
        )
        summary = worker.run()
        events = proxy.wait_fired(1, timeout=5)
        stats = proxy.stats

    assert [e.kind for e in events] == [fault]
    if fault == "cut_reply":
        assert events[0].reply_tag == "COMMIT", "the server did commit the batch"

    rows = ledger(pg_conn, "unknown")
    batches = len(rows)
    assert batches == N // BATCH == summary.batches
    # No takeover, no re-claim: one epoch, the worker kept its lease throughout.
    assert {r[4] for r in rows} == {1}

    # Resolved by reading the partition row: exactly one read, and what it saw.
    assert len(reads) == 1, reads
    seen_offset, seen_epoch = reads[0]
    failed = rows[skip]  # the batch whose COMMIT was cut
    assert seen_epoch == 1
    before = failed[2] if skip else None  # a partition's first batch starts from NULL
    assert seen_offset == (failed[3] if landed else before)
    messages = [r.getMessage() for r in caplog.records if r.name == "pgstream.task"]
    if landed:
        assert any("COMMIT outcome was unknown; the batch landed" in m for m in messages)
        # not re-sent: every checkpoint transaction the server saw is one ledger row
        assert stats.checkpoint_txns == batches
        assert stats.checkpoint_commits_forwarded == batches
    else:
        assert any("the batch did not land: retrying" in m for m in messages)
        # re-run exactly once, after the partition row said it had not landed
        assert stats.checkpoint_txns == batches + 1
        assert stats.checkpoint_commits_forwarded == batches
    assert stats.connections >= 2  # the worker reconnected through the proxy

    data = path.read_bytes()
    committed = assert_ledger_tiles(pg_conn, "unknown", {("events", "0"): 0})
    assert committed == {("events", "0"): len(data)}
    assert_exact(pg_conn, "unknown", expected_from(data))
    verify_clean(app, pg_dsn)


@pytest.mark.parametrize("fault", ["drop_commit", "cut_reply"])
@pytest.mark.parametrize("protocol", ["simple", "prepared", "pipeline"])
def test_proxy_fails_commit_in_every_protocol_form(
    fault: Any, protocol: str, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """The proxy itself: COMMIT as a simple query ('Q'), as a prepared statement (Parse once,
    then Bind/Execute/Sync) and in pipeline mode (Parse/Bind/Execute ... Sync) is found and
    failed; the client always sees a lost connection, the server's outcome is the fault's."""
    pg_conn.execute("CREATE TABLE t (v int)")
    with PgProxy.for_dsn(pg_dsn) as proxy:
        conn = psycopg.connect(proxy.dsn(pg_dsn), autocommit=True)
        try:
            if protocol == "prepared":
                for _ in range(3):  # prepare COMMIT on the server first
                    conn.execute("BEGIN")
                    conn.execute("COMMIT", prepare=True)
            proxy.arm(fault, any_commit=True)
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (%s)", [1])
            with pytest.raises(psycopg.OperationalError):
                if protocol == "pipeline":
                    with conn.pipeline():
                        conn.execute("COMMIT")
                else:
                    conn.execute("COMMIT", prepare=protocol == "prepared")
        finally:
            conn.close()
        events = proxy.wait_fired(1, timeout=5)
    assert [e.kind for e in events] == [fault]
    rows = pg_conn.execute("SELECT count(*) FROM t").fetchone()
    assert rows == ((1,) if fault == "cut_reply" else (0,))

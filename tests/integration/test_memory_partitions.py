"""The worker over a source with several partitions (the in-memory fake): every partition is
claimed, read in its own batches and checkpointed at its own offset in PostgreSQL."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
from memory_source import MemorySource

import pgstream as ps
from pgstream.runtime.leases import Lease
from pgstream.runtime.observers import WorkerObserver
from pgstream.runtime.worker import Worker

SIZES = {"a": 120, "b": 75, "c": 1, "d": 0}


class Claims(WorkerObserver):
    def __init__(self) -> None:
        self.leases: list[tuple[str, str, int, int | None]] = []

    def claimed(self, lease: Lease) -> None:
        self.leases.append((lease.source, lease.partition, lease.epoch, lease.committed_offset))


def _app(source: MemorySource) -> ps.App:
    app = ps.App("memory-parts", batch_size=50, lease_seconds=5)
    stream = app.stream("events", source)
    stream.map(lambda r: {"n": r["n"], "part": r["part"]}).to_table("out")
    stream.key_by("part").aggregate(n=ps.count(), total=ps.sum("n")).to_table("per_part")
    return app


def _tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE out (n bigint, part text, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    conn.execute("CREATE TABLE per_part (part text PRIMARY KEY, n bigint, total bigint)")


def _source() -> MemorySource:
    return MemorySource(
        "mem", {p: [{"n": i, "part": p} for i in range(size)] for p, size in SIZES.items()}
    )


def _ledger(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[int, int]]]:
    rows = conn.execute(
        "SELECT partition, start_offset, end_offset FROM pgstream.batches "
        "WHERE job = 'memory-parts' ORDER BY partition, start_offset"
    ).fetchall()
    ledger: dict[str, list[tuple[int, int]]] = {}
    for partition, start, end in rows:
        ledger.setdefault(partition, []).append((start, end))
    return ledger


def test_every_partition_is_claimed_batched_and_checkpointed_on_its_own(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    _tables(pg_conn)
    source = _source()
    claims = Claims()
    worker = Worker(
        _app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False,
        observers=[claims],
    )
    summary = worker.run()

    # claims: each partition once, at its first epoch, from the start
    assert sorted(claims.leases) == [("events", p, 1, None) for p in sorted(SIZES)]
    # the source was opened once per partition, with the job's database in the context
    assert sorted(p for p, _ in source.opened) == sorted(SIZES)
    assert {ctx.dsn for _, ctx in source.opened} == {pg_dsn}
    # reads of a partition are contiguous and never cross into another partition's offsets
    for p, size in SIZES.items():
        ends = [end for part, _, end in source.reads if part == p]
        assert max(ends) == size

    # batches per partition: the ledger tiles [0, size) in batches of at most 50 records
    ledger = _ledger(pg_conn)
    assert set(ledger) == {p for p, size in SIZES.items() if size}
    for p, ranges in ledger.items():
        assert ranges[0][0] == 0 and ranges[-1][1] == SIZES[p]
        assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(ranges))
        assert all(0 < end - start <= 50 for start, end in ranges)
    assert len(ledger["a"]) >= 3 and len(ledger["b"]) >= 2 and ledger["c"] == [(0, 1)]
    assert summary.batches == sum(len(r) for r in ledger.values())
    assert summary.records == sum(SIZES.values())

    # offsets per partition, in the checkpoint
    offsets = dict(
        pg_conn.execute(
            "SELECT partition, committed_offset FROM pgstream.partitions "
            "WHERE job = 'memory-parts' AND source = 'events'"
        ).fetchall()
    )
    assert offsets == {"a": 120, "b": 75, "c": 1, "d": None}

    # outputs: each partition's records exactly once, tagged with their partition and offset
    rows = pg_conn.execute("SELECT part, _partition, _offset, n FROM out").fetchall()
    assert sorted(rows) == sorted(
        (p, p, i, i) for p, size in SIZES.items() for i in range(size)
    )
    assert dict(
        (part, (n, total))
        for part, n, total in pg_conn.execute("SELECT part, n, total FROM per_part").fetchall()
    ) == {"a": (120, sum(range(120))), "b": (75, sum(range(75))), "c": (1, 0)}


def test_a_restart_resumes_each_partition_at_its_own_offset(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    _tables(pg_conn)
    source = _source()
    app = _app(source)
    Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    source.append("b", *({"n": i, "part": "b"} for i in range(75, 80)))
    source.append("d", {"n": 0, "part": "d"})
    source.reads.clear()
    claims = Claims()
    Worker(
        app, pg_dsn, stop_when_idle=True, install_signal_handlers=False, observers=[claims]
    ).run()

    # claimed again at the next epoch, from each partition's committed offset
    assert sorted(claims.leases) == [
        ("events", "a", 2, 120), ("events", "b", 2, 75), ("events", "c", 2, 1),
        ("events", "d", 2, None),
    ]
    assert {(p, start) for p, start, _ in source.reads} <= {
        ("a", 120), ("b", 75), ("b", 80), ("c", 1), ("d", 0), ("d", 1)
    }
    ledger = _ledger(pg_conn)
    assert ledger["b"][-1] == (75, 80) and ledger["d"] == [(0, 1)]
    assert pg_conn.execute("SELECT count(*) FROM out").fetchone() == (sum(SIZES.values()) + 6,)

"""Batches evaluated ahead and released input: a sink that rejects a row still isolates exactly
that record (its batch is read again from the source to bisect), from a file and a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.runtime.worker import run_app

N = 3_000
BAD = 1_234  # its cents break the sink's CHECK


def make_input(kind: str, conn: psycopg.Connection[Any], tmp_path: Path) -> ps.Source:
    events = [{"id": i, "amount": -1 if i == BAD else i % 50} for i in range(1, N + 1)]
    if kind == "file":
        path = tmp_path / "events.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in events))
        return ps.FileSource(path)
    conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, amount bigint)")
    with conn.cursor() as cur, cur.copy("COPY events (id, amount) FROM STDIN") as copy:
        for e in events:
            copy.write_row((e["id"], e["amount"]))
    conn.execute("SELECT setval('events_id_seq', %s)", [N])
    return ps.TableSource("events")


@pytest.mark.parametrize("kind", ["file", "table"])
@pytest.mark.parametrize("batch_size", [7, 400_000])
def test_rejected_row_is_bisected_out_of_a_released_batch(
    kind: str, batch_size: int, pg_dsn: str, pg_conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pg_conn.execute(
        "CREATE TABLE facts (id bigint, cents bigint CHECK (cents >= 0), _source text, "
        "_partition text, _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    app = ps.App("ahead", batch_size=batch_size)
    app.stream("events", make_input(kind, pg_conn, tmp_path)).map(
        lambda e: {"id": e["id"], "cents": e["amount"] * 100}
    ).to_table("facts")
    summary = run_app(app, pg_dsn, stop_when_idle=True)
    assert summary.records == N and summary.dead_letters == 1
    ids = [r[0] for r in pg_conn.execute("SELECT id FROM facts ORDER BY id").fetchall()]
    assert ids == [i for i in range(1, N + 1) if i != BAD]
    dead = pg_conn.execute("SELECT payload, error FROM pgstream.dead_letters").fetchall()
    assert len(dead) == 1 and json.loads(dead[0][0])["id"] == BAD
    assert "sink rejected" in dead[0][1]

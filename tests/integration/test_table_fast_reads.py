"""The table source's fast path on a real PostgreSQL: rows arrive as they always did (types,
time zones, unknown types as text), a field-only pipeline reads only its columns, and jobs
over the fast path produce exactly the reference output."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.runtime.worker import run_app
from pgstream.sources.base import OpenContext
from pgstream.sources.raw import TableRows
from pgstream.sources.table import MIN_OFFSET, TableReader, TableSource

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _events(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        """
        CREATE TYPE mood AS ENUM ('happy', 'sad');
        CREATE TABLE events (id bigserial PRIMARY KEY, "user" text, amount bigint,
            price numeric, ts timestamptz, mood mood, doc jsonb, note text);
        """
    )
    conn.execute(
        """
        INSERT INTO events ("user", amount, price, ts, mood, doc, note)
        SELECT 'u' || (i %% 7), (i * 37) %% 23 - 3, i / 4.0,
               %s::timestamptz + make_interval(secs => i * 13),
               CASE WHEN i %% 2 = 0 THEN 'happy' ELSE 'sad' END::mood,
               jsonb_build_object('i', i), CASE WHEN i %% 5 = 0 THEN NULL ELSE 'n' || i END
          FROM generate_series(1, %s) i
        """,
        [T0, n],
    )


def _read_all(reader: TableReader, chunk: int = 40) -> list[TableRows]:
    out: list[TableRows] = []
    pos = MIN_OFFSET
    while True:
        rows = reader.read_raw(pos, chunk)
        if rows.end == pos:
            return out
        out.append(rows)
        pos = rows.end


def test_rows_keep_their_types_whatever_the_format(pg_empty_dsn: str) -> None:
    """The first read is text, the next binary (every column here but the enum has a binary
    loader, so text stays); the values are the same either way."""
    with psycopg.connect(pg_empty_dsn, autocommit=True) as conn:
        _events(conn, 100)
        conn.execute("ALTER TABLE events DROP COLUMN mood")
        want = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    src = TableSource("events")
    reader = src.open("0", OpenContext(pg_empty_dsn))
    try:
        batches = _read_all(reader)
        assert reader._binary is True
    finally:
        reader.close()
    records = [r for b in batches for r in b.records()]
    assert [tuple(r.value.values()) for r in records if r.value] == want
    first = records[0].value
    assert first is not None and isinstance(first["price"], Decimal)
    assert first["doc"] == {"i": 1} and first["ts"] == T0 + timedelta(seconds=13)
    assert first["ts"].utcoffset() == timedelta(0)


def test_an_unknown_type_stays_text(pg_empty_dsn: str) -> None:
    """An enum has no binary loader: it would arrive as bytes, so the reader keeps text."""
    with psycopg.connect(pg_empty_dsn, autocommit=True) as conn:
        _events(conn, 100)
    reader = TableSource("events").open("0", OpenContext(pg_empty_dsn))
    try:
        records = [r for b in _read_all(reader) for r in b.records()]
        assert reader._binary is False
    finally:
        reader.close()
    moods = {r.value["mood"] for r in records if r.value}
    assert moods == {"happy", "sad"}


def test_time_zone_of_the_session_is_kept(pg_empty_dsn: str) -> None:
    """A database whose TimeZone is not UTC gives datetimes in that zone, as before."""
    with psycopg.connect(pg_empty_dsn, autocommit=True) as conn:
        _events(conn, 3)
        db = conn.info.dbname
        conn.execute(f"ALTER DATABASE \"{db}\" SET TimeZone = 'Europe/Paris'")
    reader = TableSource("events").open("0", OpenContext(pg_empty_dsn))
    try:
        rec = reader.read(MIN_OFFSET, 10).records[0].value
    finally:
        reader.close()
    assert rec is not None
    assert rec["ts"] == T0 + timedelta(seconds=13)
    assert rec["ts"].utcoffset() == timedelta(hours=1)


def test_fields_select_only_those_columns(pg_empty_dsn: str) -> None:
    with psycopg.connect(pg_empty_dsn, autocommit=True) as conn:
        _events(conn, 10)
        src = TableSource("events")
        assert src.select_columns(frozenset({"user"})) is None  # not validated yet
        src.validate(conn)
    assert src.select_columns(frozenset({"amount", "user", "nope"})) == ("user", "amount")
    assert src.select_columns(None) is None
    reader = src.open("0", OpenContext(pg_empty_dsn, frozenset({"amount", "user"})))
    try:
        rows = reader.read_raw(MIN_OFFSET, 100)
    finally:
        reader.close()
    assert rows.names == ("user", "amount") and len(rows.rows[0]) == 3  # the id comes last
    assert [r.offset for r in rows.records()] == list(range(1, 11))
    assert rows.records()[0].value == {"user": "u1", "amount": 11}
    given = TableSource("events", columns=["note"])
    assert given.select_columns(frozenset({"user"})) == ("note",)  # columns= wins


def _reference(rows: list[tuple[Any, ...]]) -> dict[str, list[int]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for user, amount in rows:
        totals[user][0] += 1
        totals[user][1] += amount
    return dict(totals)


@pytest.mark.parametrize(("keyed_only", "pushdown"), [(True, False), (False, False), (True, True)])
def test_jobs_over_the_fast_path_give_the_reference(
    pg_dsn: str, keyed_only: bool, pushdown: bool
) -> None:
    """A field-only aggregate (tuples, only its columns) or a filtered one (dicts) beside an
    append map read the same table; a record whose amount cannot be summed is dead-lettered
    at its offset and has no effect anywhere. With pushdown on, SQL cannot sum a jsonb column:
    the path falls back to Python for good and gives the same result."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _events(conn, 3000)
        conn.execute("ALTER TABLE events ALTER COLUMN amount TYPE jsonb USING to_jsonb(amount)")
        conn.execute("""UPDATE events SET amount = '"x"' WHERE id = 777""")
        conn.execute(
            """
            CREATE TABLE totals ("user" text PRIMARY KEY, n bigint NOT NULL, total bigint);
            CREATE TABLE facts (id bigint, cents bigint, _source text NOT NULL,
                _partition text NOT NULL, _offset bigint NOT NULL, _seq int NOT NULL,
                UNIQUE (_source, _partition, _offset, _seq));
            """
        )
        rows = conn.execute(
            """SELECT "user", amount::text::bigint FROM events WHERE id <> 777 ORDER BY id"""
        ).fetchall()
    app = ps.App("fast", batch_size=700, pushdown=pushdown)
    events = app.stream("events", ps.TableSource("events"))
    keyed = events if keyed_only else events.filter(lambda e: e["id"] > 0)
    keyed.key_by("user").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("totals")
    if not keyed_only:
        events.map(lambda e: {"id": e["id"], "cents": e["amount"] * 100}).to_table("facts")
    summary = run_app(app, pg_dsn, stop_when_idle=True)
    assert summary.records == 3000
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        got = {u: [n, t] for u, n, t in conn.execute('SELECT "user", n, total FROM totals')}
        dead = conn.execute('SELECT "offset", payload FROM pgstream.dead_letters').fetchall()
        facts = conn.execute("SELECT count(*), sum(cents), sum(id) FROM facts").fetchone()
    assert got == _reference(rows)
    assert [d[0] for d in dead] == [777]
    if keyed_only and not pushdown:  # only the columns read are in the dead letter
        assert json.loads(dead[0][1]) == {"user": "u0", "amount": "x"}
    else:
        assert json.loads(dead[0][1])["note"] == "n777"
    if not keyed_only:
        assert facts == (2999, sum(a for _, a in rows) * 100, sum(range(1, 3001)) - 777)


def test_a_table_altered_between_reads_keeps_its_records_right(pg_empty_dsn: str) -> None:
    """A column dropped and one of a text-only type added while a reader reads binary: the
    next rows carry the new columns, each value under its own name, the new one as text."""
    with psycopg.connect(pg_empty_dsn, autocommit=True) as conn:
        _events(conn, 100)
        conn.execute("ALTER TABLE events DROP COLUMN mood")
        reader = TableSource("events").open("0", OpenContext(pg_empty_dsn))
        try:
            first = reader.read_raw(MIN_OFFSET, 30)
            second = reader.read_raw(first.end, 30)
            assert reader._binary is True
            conn.execute("ALTER TABLE events DROP COLUMN price")
            conn.execute("ALTER TABLE events ADD COLUMN feeling mood DEFAULT 'sad'")
            rest = [r for b in _read_all_from(reader, second.end) for r in b.records()]
        finally:
            reader.close()
        want = conn.execute(
            'SELECT id, "user", amount, note FROM events WHERE id > 60 ORDER BY id'
        ).fetchall()
    assert "price" in second.records()[0].value  # type: ignore[operator]
    assert [(r.value or {}).get("feeling") for r in rest] == ["sad"] * 40
    assert [(r.offset, v["user"], v["amount"], v["note"]) for r in rest if (v := r.value)] == want
    assert all("price" not in (r.value or {}) for r in rest)


def _read_all_from(reader: TableReader, pos: int) -> list[TableRows]:
    out: list[TableRows] = []
    while (rows := reader.read_raw(pos, 25)).end != pos:
        out.append(rows)
        pos = rows.end
    return out

"""What pgstream is compared with, on the same machine in the same run.

* **floor**: parse the file with orjson and COPY the workload's result rows into a table of the
  same shape (the sink table itself, idempotency columns and index included), streaming rows into
  one COPY as they are produced, in one transaction, with no checkpointing. B1 and B3 aggregate
  in a dict first (B3 computes each event's window with ``datetime.fromisoformat``) and COPY one
  row per user (and window). Nothing correct can be much faster than this in Python.
* **table floor**: the same events read from ``bench_events`` as fast as psycopg allows (in
  ``TABLE_BATCH``-row pages by id, with the fastest of the :data:`TABLE_READS`, measured in the
  same run by :func:`read_speeds`), only the columns the workload uses, the same Python work as
  the file floor on the fetched tuples, one streaming COPY into the sink (the rows' ``_offset``
  is the event's id), no checkpoint.
* **per-record**: what a user would hand-write for exactly-once without a framework: one
  transaction per event that stores the offset and the event's result. Run for ``cap`` seconds
  and extrapolated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

from benchmarks.workloads import EVENTS_TABLE, SINK, STREAM, WINDOW_SECONDS, window_of

# B2's floors write in COPY's binary format: 1.5x faster than text for these rows on this
# machine (1M rows: 1.2 s against 1.8-2.1 s), and a floor is the fastest psycopg allows
_B2_COPY = (
    f"COPY {SINK['B2']} (id, user_id, amount_cents, _source, _partition, _offset, _seq) "
    "FROM STDIN (FORMAT BINARY)"
)
_B2_TYPES = ["int8", "text", "int8", "text", "text", "int8", "int4"]


def floor(conn: psycopg.Connection[Any], workload: str, path: Path) -> float:
    """Run the floor of ``workload`` over ``path``; return its wall time in seconds."""
    loads = orjson.loads
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur, open(path, "rb") as f:
        if workload == "B2":
            with cur.copy(_B2_COPY) as copy:
                copy.set_types(_B2_TYPES)
                write_row = copy.write_row
                pos = 0
                for line in f:
                    e = loads(line)
                    write_row((e["id"], e["user"], e["amount"] * 100, STREAM, "0", pos, 0))
                    pos += len(line)
        elif workload == "B1":
            totals: dict[str, list[int]] = {}
            for line in f:
                e = loads(line)
                t = totals.get(e["user"])
                if t is None:
                    totals[e["user"]] = [1, e["amount"]]
                else:
                    t[0] += 1
                    t[1] += e["amount"]
            with cur.copy(f'COPY {SINK["B1"]} ("user", n, total) FROM STDIN') as copy:
                for user, (n, total) in totals.items():
                    copy.write_row((user, n, total))
        else:
            windows: dict[tuple[str, float], list[int]] = {}
            fromisoformat = datetime.fromisoformat
            for line in f:
                e = loads(line)
                epoch = fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
                key = (e["user"], epoch - epoch % WINDOW_SECONDS)
                w = windows.get(key)
                if w is None:
                    windows[key] = [1, e["amount"]]
                else:
                    w[0] += 1
                    w[1] += e["amount"]
            stmt = f'COPY {SINK["B3"]} ("user", window_start, n, total) FROM STDIN'
            with cur.copy(stmt) as copy:
                for (user, start), (n, total) in windows.items():
                    copy.write_row((user, datetime.fromtimestamp(start, timezone.utc), n, total))
    return time.perf_counter() - started


#: rows per page of the table floor's reads
TABLE_BATCH = 100_000
#: the columns of ``bench_events`` each workload's floor reads (the id first: pages and offsets)
TABLE_COLUMNS = {
    "B1": ("id", "user", "amount"),
    "B2": ("id", "user", "amount"),
    "B3": ("id", "user", "amount", "ts"),
}
_PG_TYPES = {"id": "bigint", "user": "text", "amount": "bigint", "ts": "timestamptz"}
Page = list[tuple[Any, ...]]
TableRead = Callable[[psycopg.Connection[Any], tuple[str, ...]], Iterator[Page]]


def _select(columns: tuple[str, ...]) -> sql.Composed:
    return sql.SQL("SELECT {} FROM {} WHERE id >= %s ORDER BY id LIMIT %s").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(EVENTS_TABLE)
    )


def _fetch_pages(binary: bool) -> TableRead:
    """Pages of tuples from ``fetchall`` (text or binary result format)."""

    def pages(conn: psycopg.Connection[Any], columns: tuple[str, ...]) -> Iterator[Page]:
        query = _select(columns)
        cur = conn.cursor(binary=binary)
        lo = -(2**63)
        while rows := cur.execute(query, [lo, TABLE_BATCH]).fetchall():
            yield rows
            lo = rows[-1][0] + 1

    return pages


def _copy_pages(binary: bool) -> TableRead:
    """Pages of tuples from ``COPY (SELECT ...) TO STDOUT`` (text or binary)."""

    def pages(conn: psycopg.Connection[Any], columns: tuple[str, ...]) -> Iterator[Page]:
        fmt = sql.SQL(" (FORMAT BINARY)" if binary else "")
        stmt = sql.SQL("COPY ({}) TO STDOUT{}")
        types = [_PG_TYPES[c] for c in columns]
        cur = conn.cursor()
        lo = -(2**63)
        while True:
            query = sql.SQL("SELECT {} FROM {} WHERE id >= {} ORDER BY id LIMIT {}").format(
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.Identifier(EVENTS_TABLE),
                sql.Literal(lo),
                sql.Literal(TABLE_BATCH),
            )
            with cur.copy(stmt.format(query, fmt)) as copy:
                copy.set_types(types)
                rows = list(copy.rows())
            if not rows:
                return
            yield rows
            lo = rows[-1][0] + 1

    return pages


#: the ways the table floor may read ``bench_events``; :func:`read_speeds` measures them
TABLE_READS: dict[str, TableRead] = {
    "fetchall text": _fetch_pages(False),
    "fetchall binary": _fetch_pages(True),
    "COPY text": _copy_pages(False),
    "COPY binary": _copy_pages(True),
}


def _reader(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET TimeZone = 'UTC'")  # timestamptz values as datetimes in UTC: the fastest
    return conn


def read_speeds(dsn: str, columns: tuple[str, ...] = TABLE_COLUMNS["B3"]) -> dict[str, float]:
    """Rows/s of every :data:`TABLE_READS` method reading all of ``bench_events``."""
    speeds = {}
    with _reader(dsn) as conn:
        for name, pages in TABLE_READS.items():
            started = time.perf_counter()
            n = sum(len(page) for page in pages(conn, columns))
            speeds[name] = n / (time.perf_counter() - started)
    return speeds


def table_floor(
    conn: psycopg.Connection[Any], dsn: str, workload: str, read: str = "fetchall binary"
) -> float:
    """Run the table floor of ``workload`` (reading with ``read``, one of
    :data:`TABLE_READS`); return its wall time in seconds. ``conn`` is the writing connection
    (not in autocommit)."""
    pages = TABLE_READS[read]
    with _reader(dsn) as rconn:
        started = time.perf_counter()
        rows = (row for page in pages(rconn, TABLE_COLUMNS[workload]) for row in page)
        with conn.transaction(), conn.cursor() as cur:
            _TABLE_WORK[workload](cur, rows)
        return time.perf_counter() - started


def _b1_rows(cur: psycopg.Cursor[Any], rows: Iterator[tuple[Any, ...]]) -> None:
    totals: dict[str, list[int]] = {}
    for _, user, amount in rows:
        t = totals.get(user)
        if t is None:
            totals[user] = [1, amount]
        else:
            t[0] += 1
            t[1] += amount
    with cur.copy(f'COPY {SINK["B1"]} ("user", n, total) FROM STDIN') as copy:
        for user, (n, total) in totals.items():
            copy.write_row((user, n, total))


def _b2_rows(cur: psycopg.Cursor[Any], rows: Iterator[tuple[Any, ...]]) -> None:
    with cur.copy(_B2_COPY) as copy:
        copy.set_types(_B2_TYPES)
        write_row = copy.write_row
        for id_, user, amount in rows:
            write_row((id_, user, amount * 100, STREAM, "0", id_, 0))


def _b3_rows(cur: psycopg.Cursor[Any], rows: Iterator[tuple[Any, ...]]) -> None:
    windows: dict[tuple[str, float], list[int]] = {}
    for _, user, amount, ts in rows:
        epoch = ts.timestamp()
        key = (user, epoch - epoch % WINDOW_SECONDS)
        w = windows.get(key)
        if w is None:
            windows[key] = [1, amount]
        else:
            w[0] += 1
            w[1] += amount
    with cur.copy(f'COPY {SINK["B3"]} ("user", window_start, n, total) FROM STDIN') as copy:
        for (user, start), (n, total) in windows.items():
            copy.write_row((user, datetime.fromtimestamp(start, timezone.utc), n, total))


#: each workload's Python work and COPY over the table's rows
_TABLE_WORK: dict[str, Callable[[psycopg.Cursor[Any], Iterator[tuple[Any, ...]]], None]] = {
    "B1": _b1_rows,
    "B2": _b2_rows,
    "B3": _b3_rows,
}


Events = Generator[tuple[int, dict[str, Any]], None, None]


def file_events(path: Path) -> Events:
    """``(offset, event)`` from the file (offset = the line's byte position)."""
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            yield pos, orjson.loads(line)
            pos += len(line)


def table_events(dsn: str) -> Events:
    """``(offset, event)`` from ``bench_events`` (offset = id), through a server-side cursor."""
    with psycopg.connect(dsn) as conn, conn.cursor(name="per_record_scan") as cur:
        cur.itersize = 1000
        cur.execute(f'SELECT id, "user", amount, ts FROM {EVENTS_TABLE} ORDER BY id')
        for id_, user, amount, ts in cur:
            yield id_, {"id": id_, "user": user, "amount": amount, "ts": ts}


def per_record(dsn: str, workload: str, events: Events, cap: float) -> tuple[int, float]:
    """One durable transaction per event (offset + result) for up to ``cap`` seconds.

    Returns ``(events done, seconds)``; the sink then holds exactly those events' effects.
    """
    with psycopg.connect(dsn) as conn:
        conn.execute("SET synchronous_commit = on")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_offsets (job text PRIMARY KEY, committed bigint)"
        )
        conn.execute("DELETE FROM bench_offsets WHERE job = 'per_record'")
        conn.execute("INSERT INTO bench_offsets VALUES ('per_record', NULL)")
        conn.commit()
        if workload == "B2":
            write = (
                f"INSERT INTO {SINK['B2']} (id, user_id, amount_cents, _source, _partition, "
                "_offset, _seq) VALUES (%s, %s, %s, %s, '0', %s, 0)"
            )
        elif workload == "B1":
            write = (
                f'INSERT INTO {SINK["B1"]} AS t ("user", n, total) VALUES (%s, 1, %s) '
                'ON CONFLICT ("user") DO UPDATE SET n = t.n + 1, total = t.total + EXCLUDED.total'
            )
        else:
            write = (
                f'INSERT INTO {SINK["B3"]} AS t ("user", window_start, n, total) '
                'VALUES (%s, to_timestamp(%s), 1, %s) ON CONFLICT ("user", window_start) '
                "DO UPDATE SET n = t.n + 1, total = t.total + EXCLUDED.total"
            )
        done = 0
        started = time.perf_counter()
        deadline = started + cap
        with conn.cursor() as cur:
            for offset, e in events:
                cur.execute(
                    "UPDATE bench_offsets SET committed = %s WHERE job = 'per_record'", [offset]
                )
                if workload == "B2":
                    cur.execute(write, (e["id"], e["user"], e["amount"] * 100, STREAM, offset))
                elif workload == "B1":
                    cur.execute(write, (e["user"], e["amount"]))
                else:
                    ts = e["ts"] if isinstance(e["ts"], str) else e["ts"].isoformat()
                    cur.execute(write, (e["user"], window_of(ts), e["amount"]))
                conn.commit()
                done += 1
                if time.perf_counter() >= deadline:
                    break
        elapsed = time.perf_counter() - started
    return done, elapsed


def check_per_record(conn: psycopg.Connection[Any], workload: str, done: int) -> list[str]:
    """The sink holds the effects of exactly ``done`` events."""
    if workload == "B2":
        row = conn.execute(f"SELECT count(*) FROM {SINK['B2']}").fetchone()
    else:
        row = conn.execute(f"SELECT coalesce(sum(n), 0) FROM {SINK[workload]}").fetchone()
    got = int(row[0]) if row else -1
    return [] if got == done else [f"per-record {workload}: {got} effects for {done} events"]

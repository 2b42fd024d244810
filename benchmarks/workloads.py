"""The workloads (pgstream apps and their sink tables), the reference answers and the checks.

* **B1** running totals: ``key_by("user").aggregate(n=count(), total=sum("amount"))`` into the
  upsert sink ``bench_b1``.
* **B2** map: one row ``(id, user_id, amount_cents)`` per event into the append sink
  ``bench_b2``.
* **B3** windows: B1 per user and 60-second tumbling event-time window (``ts``) into the upsert
  sink ``bench_b3`` keyed on ``("user", window_start)``. Variants, run when named in
  ``--workloads`` and compared with B3's floor: **B3G** the same with ``grace=10`` (watermark
  and late-record checks; the input's five seconds of disorder make nothing late), **B3F**
  ``emit="final"`` (``grace=10``: only windows the last watermark closed are written) and
  **B3H** hopping windows ``hopping(seconds=60, every=10)`` with ``grace=10``.

Both read the stream ``events`` from a :class:`~pgstream.FileSource` (the JSONL file) or a
:class:`~pgstream.TableSource` (``bench_events``, holding the same events). The sink tables are
created with pgstream's SQLAlchemy helpers, as a user's migration would.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql
from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

import pgstream as ps
from pgstream.schema import append_table, upsert_table

WORKLOADS = ("B1", "B2", "B3")
#: "table" runs every path in Python (pushdown off), "table-sql" pushes them down into SQL
SOURCES = ("file", "table", "table-sql")
#: the floor each source's rows are compared with (besides the file floor): its own input read
#: as fast as plain Python can (a new source kind, e.g. a pushed-down table path, adds a line)
FLOOR_OF = {"file": "file", "table": "table", "table-sql": "table"}
STREAM = "events"
EVENTS_TABLE = "bench_events"
#: B3 with watermarks: window() options (``every``: hopping windows of WINDOW_SECONDS)
WINDOW_VARIANTS: dict[str, dict[str, Any]] = {
    "B3G": {"grace": 10},
    "B3F": {"grace": 10, "emit": "final"},
    "B3H": {"grace": 10, "every": 10},
}
SINK = {"B1": "bench_b1", "B2": "bench_b2", "B3": "bench_b3"} | dict.fromkeys(
    WINDOW_VARIANTS, "bench_b3"
)
WINDOW_SECONDS = 60
HOP_SECONDS = 10
MIN_OFFSET = -(2**63)


def to_cents(e: dict[str, Any]) -> dict[str, Any]:
    """B2's map: one output row per event."""
    return {"id": e["id"], "user_id": e["user"], "amount_cents": e["amount"] * 100}


def make_app(
    workload: str,
    source: str,
    path: Path | str,
    job: str,
    *,
    batch_size: int | None = None,
) -> ps.App:
    """The pgstream app of ``workload`` reading ``source`` ("file", "table", "table-sql", or
    "kafka" with ``path`` = ``"host:port/topic"``)."""
    app = ps.App(job, batch_size=batch_size, pushdown=source == "table-sql")
    src: ps.Source
    if source == "kafka":  # path is "host:port/topic" (benchmarks/kafka.py)
        bootstrap, topic = str(path).rsplit("/", 1)
        src = ps.KafkaSource(topic, bootstrap_servers=bootstrap)
    elif source == "file":
        src = ps.FileSource(str(path))
    else:
        src = ps.TableSource(EVENTS_TABLE)
    events = app.stream(STREAM, src)
    if workload == "B2" and source == "table-sql":  # B2 as column expressions: pushed down
        events.select(
            id=ps.col("id"), user_id=ps.col("user"), amount_cents=ps.col("amount") * 100
        ).to_table(SINK["B2"])
    elif workload == "B1":
        events.key_by("user").aggregate(n=ps.count(), total=ps.sum("amount")).to_table(SINK["B1"])
    elif workload == "B2":
        events.map(to_cents).to_table(SINK["B2"])
    elif workload == "B3":
        events.key_by("user").window(ps.tumbling(seconds=WINDOW_SECONDS), time="ts").aggregate(
            n=ps.count(), total=ps.sum("amount")
        ).to_table(SINK["B3"])
    elif workload in WINDOW_VARIANTS:
        options = dict(WINDOW_VARIANTS[workload])
        every = options.pop("every", None)
        kind = (
            ps.tumbling(seconds=WINDOW_SECONDS)
            if every is None
            else ps.hopping(seconds=WINDOW_SECONDS, every=every)
        )
        events.key_by("user").window(kind, time="ts", **options).aggregate(
            n=ps.count(), total=ps.sum("amount")
        ).to_table(SINK[workload])
    else:
        raise ValueError(f"unknown workload {workload!r}")
    return app


# -- tables -------------------------------------------------------------------------------------


def _sink_tables() -> dict[str, Table]:
    md = MetaData()
    b1 = upsert_table(
        SINK["B1"],
        md,
        Column("user", Text, primary_key=True),
        Column("n", BigInteger, nullable=False),
        Column("total", BigInteger),
    )
    b2 = append_table(
        SINK["B2"],
        md,
        Column("id", BigInteger, nullable=False),
        Column("user_id", Text, nullable=False),
        Column("amount_cents", BigInteger, nullable=False),
    )
    b3 = upsert_table(
        SINK["B3"],
        md,
        Column("user", Text, primary_key=True),
        Column("window_start", DateTime(timezone=True), primary_key=True),
        Column("n", BigInteger, nullable=False),
        Column("total", BigInteger),
    )
    return {"B1": b1, "B2": b2, "B3": b3} | dict.fromkeys(WINDOW_VARIANTS, b3)


def create_sink(conn: psycopg.Connection[Any], workload: str) -> None:
    """(Re)create ``workload``'s sink table, empty, with the helper's columns and indexes."""
    table = _sink_tables()[workload]
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table.name)))
    # the jobs that wrote the old table are gone with it: forget their plans, or the next
    # job writing the new table would be refused as a second job writing one table
    conn.execute(
        "DELETE FROM pgstream.jobs j WHERE EXISTS (SELECT 1 FROM jsonb_array_elements("
        "j.plan -> 'sinks') s WHERE s ->> 'table' = %s)",
        [table.name],
    )
    conn.execute(str(CreateTable(table).compile(dialect=dialect)))
    for index in table.indexes:
        conn.execute(str(CreateIndex(index).compile(dialect=dialect)))


def forget_job(conn: psycopg.Connection[Any], job: str) -> None:
    """Delete everything pgstream recorded for ``job`` (offsets, ledger, dead letters, plan)."""
    for table in ("dead_letters", "state", "workers", "partitions", "jobs"):  # batches cascade
        conn.execute(
            sql.SQL("DELETE FROM pgstream.{} WHERE job = %s").format(sql.Identifier(table)), [job]
        )


def load_events_table(conn: psycopg.Connection[Any], path: Path) -> int:
    """(Re)create ``bench_events`` holding the file's events; return the row count."""
    conn.execute(f"DROP TABLE IF EXISTS {EVENTS_TABLE}")
    conn.execute(
        f'CREATE TABLE {EVENTS_TABLE} (id bigserial PRIMARY KEY, "user" text NOT NULL, '
        "amount bigint NOT NULL, ts timestamptz NOT NULL)"
    )
    n = 0
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(f'COPY {EVENTS_TABLE} (id, "user", amount, ts) FROM STDIN') as copy:
            for e in read_events(path):
                copy.write_row((e["id"], e["user"], e["amount"], e["ts"]))
                n += 1
        cur.execute(
            f"SELECT setval(pg_get_serial_sequence('{EVENTS_TABLE}', 'id'), "
            f"(SELECT coalesce(max(id), 1) FROM {EVENTS_TABLE}))"
        )
    conn.execute(f"VACUUM ANALYZE {EVENTS_TABLE}")
    return n


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The file's events, decoded."""
    loads = orjson.loads
    with open(path, "rb") as f:
        for line in f:
            yield loads(line)


def checkpoint(conn: psycopg.Connection[Any]) -> None:
    """Flush dirty buffers before a timed run so no run pays for the previous one's writes."""
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


# -- reference answers and checks ---------------------------------------------------------------


@dataclass(slots=True)
class Reference:
    """What every run must produce, computed from the input file alone."""

    n: int = 0
    size: int = 0  # file size = the file source's final committed offset
    max_id: int = 0
    sum_id: int = 0
    sum_cents: int = 0
    sum_line_starts: int = 0  # the file source's offsets are the lines' byte positions
    totals: dict[str, list[int]] = field(default_factory=dict)
    windows: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (user, epoch s)
    #: per (user, HOP_SECONDS bucket): what the hopping windows sum; the largest event time
    buckets: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    max_epoch: float = -math.inf


def window_of(ts: str, size: int = WINDOW_SECONDS) -> int:
    """The epoch second where the ``size`` s window holding ``ts`` starts."""
    epoch = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return int(epoch - epoch % size)


def reference(path: Path) -> Reference:
    """Scan the file once and compute every answer."""
    ref = Reference()
    totals, windows = ref.totals, ref.windows
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            e = orjson.loads(line)
            ref.sum_line_starts += pos
            pos += len(line)
            ref.n += 1
            ref.sum_id += e["id"]
            ref.sum_cents += e["amount"] * 100
            ref.max_id = max(ref.max_id, e["id"])
            t = totals.get(e["user"])
            if t is None:
                totals[e["user"]] = [1, e["amount"]]
            else:
                t[0] += 1
                t[1] += e["amount"]
            epoch = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
            ref.max_epoch = max(ref.max_epoch, epoch)
            for size, into in ((WINDOW_SECONDS, windows), (HOP_SECONDS, ref.buckets)):
                w = into.setdefault((e["user"], int(epoch - epoch % size)), [0, 0])
                w[0] += 1
                w[1] += e["amount"]
    ref.size = path.stat().st_size
    return ref


def check_events_table(conn: psycopg.Connection[Any], ref: Reference) -> list[str]:
    """``bench_events`` holds exactly the file's events (the table source's input)."""
    row = conn.execute(
        f"SELECT count(*), count(DISTINCT id), coalesce(sum(id), 0), "
        f"coalesce(sum(amount * 100), 0) FROM {EVENTS_TABLE}"
    ).fetchone()
    assert row is not None
    if tuple(int(x) for x in row) != (ref.n, ref.n, ref.sum_id, ref.sum_cents):
        return [f"{EVENTS_TABLE} does not match the file: {row}"]
    per_user = conn.execute(
        f'SELECT "user", count(*), sum(amount) FROM {EVENTS_TABLE} GROUP BY 1'
    ).fetchall()
    got = {u: [int(c), int(s)] for u, c, s in per_user}
    return [] if got == ref.totals else [f"{EVENTS_TABLE} per-user totals differ from the file"]


def check_b1(conn: psycopg.Connection[Any], ref: Reference) -> list[str]:
    """Every user's count and total equal the reference (no missing, extra or double counts)."""
    rows = conn.execute(f'SELECT "user", n, total FROM {SINK["B1"]}').fetchall()
    got = {u: [int(n), int(t)] for u, n, t in rows}
    if got == ref.totals:
        return []
    missing = len(ref.totals.keys() - got.keys())
    extra = len(got.keys() - ref.totals.keys())
    wrong = sum(1 for k, v in got.items() if k in ref.totals and ref.totals[k] != v)
    return [f"B1: {missing} users missing, {extra} unexpected, {wrong} with wrong n/total"]


def b3_windows(ref: Reference, workload: str) -> dict[tuple[str, int], list[int]]:
    """B3's windows, or a variant's: those the last watermark closed (B3F), hopping (B3H)."""
    if workload == "B3F":
        grace = WINDOW_VARIANTS["B3F"]["grace"]
        return {
            k: v for k, v in ref.windows.items() if k[1] + WINDOW_SECONDS + grace < ref.max_epoch
        }
    if workload != "B3H":
        return ref.windows
    hops: dict[tuple[str, int], list[int]] = {}
    for (user, b), (n, total) in ref.buckets.items():
        for s in range(b - WINDOW_SECONDS + HOP_SECONDS, b + 1, HOP_SECONDS):
            w = hops.setdefault((user, s), [0, 0])
            w[0] += n
            w[1] += total
    return hops


def check_b3(conn: psycopg.Connection[Any], ref: Reference, workload: str = "B3") -> list[str]:
    """Every (user, window) count and total equal the reference."""
    rows = conn.execute(
        f'SELECT "user", extract(epoch FROM window_start)::bigint, n, total FROM {SINK["B3"]}'
    ).fetchall()
    got = {(u, int(w)): [int(n), int(t)] for u, w, n, t in rows}
    want = b3_windows(ref, workload)
    if got == want:
        return []
    missing = len(want.keys() - got.keys())
    extra = len(got.keys() - want.keys())
    wrong = sum(1 for k, v in got.items() if k in want and want[k] != v)
    return [f"{workload}: {missing} windows missing, {extra} unexpected, {wrong} wrong n/total"]


def check_b2(conn: psycopg.Connection[Any], ref: Reference, source: str | None) -> list[str]:
    """One correct row per event: compared row by row with ``bench_events`` (checked against
    the file by :func:`check_events_table`); ``_offset`` is the event's position in ``source``."""
    row = conn.execute(
        f"""
        SELECT count(*), count(DISTINCT s.id),
               count(*) FILTER (WHERE e.id IS NULL OR s.user_id IS DISTINCT FROM e."user"
                                   OR s.amount_cents IS DISTINCT FROM e.amount * 100),
               count(*) FILTER (WHERE s._seq <> 0 OR s._source <> %s OR s._partition <> '0'),
               count(*) FILTER (WHERE %s = 'table' AND s._offset <> s.id),
               coalesce(sum(s._offset), 0)
          FROM {SINK["B2"]} s LEFT JOIN {EVENTS_TABLE} e ON e.id = s.id
        """,
        [STREAM, source or ""],
    ).fetchone()
    assert row is not None
    rows, distinct, wrong, bad_meta, bad_offset, sum_offsets = (int(x) for x in row)
    if source == "file" and sum_offsets != ref.sum_line_starts:
        bad_offset += 1
    errors = []
    if rows != ref.n or distinct != ref.n:
        errors.append(f"B2: {rows} rows for {distinct} distinct ids, expected {ref.n}")
    if wrong:
        errors.append(f"B2: {wrong} rows differ from their event")
    if bad_meta or bad_offset:
        errors.append(
            f"B2: {bad_meta + bad_offset} rows with wrong _source/_partition/_offset/_seq"
        )
    return errors


def check_job(conn: psycopg.Connection[Any], job: str, ref: Reference, source: str) -> list[str]:
    """pgstream's own records: final offset, a gap-free ledger covering every event, no dead
    letters."""
    errors = []
    row = conn.execute(
        "SELECT committed_offset FROM pgstream.partitions WHERE job = %s AND source = %s",
        [job, STREAM],
    ).fetchone()
    want_end = ref.size if source == "file" else ref.max_id + 1
    if row is None or row[0] != want_end:
        errors.append(f"committed offset {row[0] if row else None}, expected {want_end}")
    batches = conn.execute(
        "SELECT start_offset, end_offset, records_in FROM pgstream.batches "
        "WHERE job = %s AND source = %s ORDER BY start_offset",
        [job, STREAM],
    ).fetchall()
    pos = 0 if source == "file" else MIN_OFFSET
    records = 0
    for start, end, n in batches:
        if start != pos:
            errors.append(f"ledger gap or overlap at offset {pos} (next batch starts at {start})")
            break
        pos = end
        records += n
    if records != ref.n:
        errors.append(f"ledger counts {records} records in, expected {ref.n}")
    dead = conn.execute("SELECT count(*) FROM pgstream.dead_letters WHERE job = %s", [job])
    n_dead = dead.fetchone()
    if n_dead is not None and n_dead[0]:
        errors.append(f"{n_dead[0]} dead letters")
    return errors


def check_workload(
    conn: psycopg.Connection[Any], workload: str, ref: Reference, source: str | None
) -> list[str]:
    """The sink of ``workload`` holds exactly the reference answer."""
    if workload == "B1":
        return check_b1(conn, ref)
    if workload == "B3" or workload in WINDOW_VARIANTS:
        return check_b3(conn, ref, workload)
    return check_b2(conn, ref, source)


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

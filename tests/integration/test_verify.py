"""``pgstream verify``: clean jobs pass; each kind of tampering is named; unreadable sources
are "cannot check" (exit 2)."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import secrets
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

import pgstream as ps
from pgstream.cli import main
from pgstream.db.connect import with_database
from pgstream.runtime.worker import run_app
from pgstream.verify import CannotVerify, VerifyReport, values_equal, verify_app

APP_SOURCE = """
import pgstream as ps

app = ps.App("audit", batch_size=40, max_interval=0.0)
orders = app.stream("orders", ps.TableSource("public.orders", offset_column="id"))
valid = orders.filter(lambda o: o["amount"] != 0)


def facts(o):
    if o["amount"] == 13:
        raise ValueError("thirteen")
    out = [{"order_id": o["id"], "user_id": o["user_id"], "cents": o["amount"] * 100}]
    if o["amount"] % 5 == 0:
        out.append({"order_id": o["id"], "user_id": o["user_id"], "cents": 0})
    return out


valid.flat_map(facts).to_table("facts")
valid.key_by("user_id").aggregate(
    n=ps.count(), total=ps.sum("amount"), lo=ps.min("amount"), mean=ps.avg("amount"),
).to_table("totals")
valid.key_by("user_id").window(ps.tumbling(seconds=60), time="ts").aggregate(
    n=ps.count(), total=ps.sum("amount"),
).to_table("user_minute")
valid.key_by("user_id").fold(
    {"n": 0, "last": 0}, lambda s, o: {"n": s["n"] + 1, "last": o["id"]}
).to_table("last_order")

clicks = app.stream("clicks", ps.FileSource(CLICKS))
clicks.map(lambda c: {"order_id": c["n"], "user_id": c["u"], "cents": c["ms"]}).to_table("facts")
clicks.key_by("u", name="user_id").aggregate(n=ps.count(), total=ps.sum("ms")).to_table(
    "click_totals"
)
"""

DDL = """
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id int NOT NULL, amount int NOT NULL,
    ts timestamptz NOT NULL);
CREATE TABLE user_minute (user_id int, window_start timestamptz, n bigint NOT NULL,
    total bigint, PRIMARY KEY (user_id, window_start));
CREATE TABLE facts (order_id bigint, user_id int, cents bigint CHECK (cents <> 4200),
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq int NOT NULL, UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE totals (user_id int PRIMARY KEY, n bigint NOT NULL, total bigint, lo int,
    mean numeric, _mean_sum numeric, _mean_count bigint NOT NULL DEFAULT 0);
CREATE TABLE last_order (user_id int PRIMARY KEY, n bigint, last bigint);
CREATE TABLE click_totals (user_id int PRIMARY KEY, n bigint NOT NULL, total bigint);
"""


class Setup:
    def __init__(self, dsn: str, tmp: Path) -> None:
        self.dsn = dsn
        self.clicks = tmp / "clicks.jsonl"
        name = f"verify_app_{secrets.token_hex(4)}"
        self.module = tmp / f"{name}.py"
        self.module.write_text(f"CLICKS = {str(self.clicks)!r}\n" + textwrap.dedent(APP_SOURCE))
        namespace: dict[str, Any] = {}
        exec(compile(self.module.read_text(), str(self.module), "exec"), namespace)
        self.app = namespace["app"]
        self.target = f"{self.module}:app"

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def verify(self) -> VerifyReport:
        return verify_app(self.app, self.dsn, chunk=64)

    def cli(self) -> tuple[int, str]:
        res = CliRunner().invoke(main, ["verify", self.target, "--dsn", self.dsn])
        return res.exit_code, res.output


def _populate(s: Setup) -> None:
    rng = random.Random(5)
    with s.conn() as conn:
        conn.execute(DDL)
        t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
        with conn.cursor().copy("COPY orders (user_id, amount, ts) FROM STDIN") as copy:
            for i in range(500):
                copy.write_row((rng.randrange(15), rng.choice([0, 13, 42, *range(1, 30)]),
                                t0 + dt.timedelta(seconds=7 * i)))
    with open(s.clicks, "wb") as f:
        for i in range(300):
            if i % 37 == 36:
                f.write(b"{broken\n")
            else:
                f.write(orjson.dumps({"n": i, "u": rng.randrange(9), "ms": rng.randint(1, 99)}))
                f.write(b"\n")
            if i % 50 == 0:
                f.write(b"\n")  # blank lines are covered by offsets but hold no record
    run_app(s.app, s.dsn, stop_when_idle=True)


@pytest.fixture(scope="module")
def golden(
    pg_server_dsn: str, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, bytes]]:
    """One job run to completion; tests get a clone of its database and file."""
    name = f"pgstream_t_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(pg_template)))
    try:
        s = Setup(with_database(pg_server_dsn, name), tmp_path_factory.mktemp("golden"))
        _populate(s)
        yield name, s.clicks.read_bytes()
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@pytest.fixture
def job(golden: tuple[str, bytes], pg_server_dsn: str, tmp_path: Path) -> Iterator[Setup]:
    template, clicks = golden
    name = f"pgstream_t_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
    try:
        s = Setup(with_database(pg_server_dsn, name), tmp_path)
        s.clicks.write_bytes(clicks)
        yield s
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def _kinds(report: VerifyReport) -> set[str]:
    return {v.kind for v in report.violations}


def test_clean_job_verifies(job: Setup) -> None:
    report = job.verify()
    assert report.ok, "\n".join(v.describe() for v in report.violations)
    assert report.partitions == 2
    assert report.records == 500 + 300
    assert report.batches > 10
    assert report.dead_letters > 0
    code, out = job.cli()
    assert code == 0, out
    assert "verify audit: clean" in out


def test_sink_rejections_count_as_dead_letters(job: Setup) -> None:
    # amount 42 -> cents 4200 violates the sink's CHECK: the runtime bisects the batch and
    # dead-letters the record with "sink rejected: ..."; verify accepts it as a dead letter.
    with job.conn() as conn:
        ops = conn.execute(
            "SELECT count(*) FROM pgstream.dead_letters WHERE operator = 'sink'"
        ).fetchone()
        n42 = conn.execute("SELECT count(*) FROM orders WHERE amount = 42").fetchone()
    assert ops is not None and n42 is not None
    assert ops[0] == n42[0] > 0
    assert job.verify().ok


# (SQL, expected kind, sink named in the report)
TAMPERING: dict[str, tuple[str, str, str]] = {
    "delete-append-row": (
        "DELETE FROM facts WHERE ctid = (SELECT ctid FROM facts WHERE _source = 'orders' "
        "ORDER BY _offset LIMIT 1 OFFSET 10)",
        "lost", "facts",
    ),
    "duplicate-under-other-seq": (
        "INSERT INTO facts SELECT order_id, user_id, cents, _source, _partition, _offset, 7 "
        "FROM facts WHERE _source = 'clicks' ORDER BY _offset LIMIT 1",
        "duplicated", "facts",
    ),
    "row-above-committed-offset": (
        "INSERT INTO facts VALUES (1, 1, 100, 'orders', '0', 100000, 0)",
        "unexpected", "facts",
    ),
    "file-row-above-committed-offset": (
        "INSERT INTO facts VALUES (1, 1, 100, 'clicks', '0', 10000000, 0)",
        "unexpected", "facts",
    ),
    "change-append-value": (
        "UPDATE facts SET cents = cents + 1 WHERE _source = 'orders' AND _offset = "
        "(SELECT min(_offset) FROM facts WHERE _source = 'orders')",
        "wrong-value", "facts",
    ),
    "change-aggregate": (
        "UPDATE totals SET total = total + 1 WHERE user_id = 3", "wrong-value", "totals",
    ),
    "change-avg": (
        "UPDATE totals SET mean = mean + 0.5 WHERE user_id = 4", "wrong-value", "totals",
    ),
    "change-window": (
        "UPDATE user_minute SET n = n + 1 WHERE (user_id, window_start) = (SELECT user_id, "
        "min(window_start) FROM user_minute GROUP BY user_id ORDER BY user_id LIMIT 1)",
        "wrong-value", "user_minute",
    ),
    "delete-aggregate-row": ("DELETE FROM totals WHERE user_id = 2", "lost", "totals"),
    "extra-aggregate-row": (
        "INSERT INTO click_totals VALUES (999, 1, 1)", "unexpected", "click_totals",
    ),
    "change-fold": (
        "UPDATE last_order SET last = last - 1 WHERE user_id = 1", "wrong-value", "last_order",
    ),
    "change-fold-state": (
        "UPDATE pgstream.state SET value = jsonb_set(value, '{n}', '0') "
        "WHERE key = (SELECT min(key) FROM pgstream.state)",
        "wrong-value", "pgstream.state",
    ),
    "delete-last-ledger-row": (
        "DELETE FROM pgstream.batches WHERE (source, start_offset) = (SELECT source, "
        "max(start_offset) FROM pgstream.batches WHERE source = 'orders' GROUP BY source)",
        "ledger-gap", "pgstream.batches",
    ),
    "delete-middle-ledger-row": (
        "SET session_replication_role = replica; "
        "DELETE FROM pgstream.batches WHERE (source, start_offset) = (SELECT source, "
        "start_offset FROM pgstream.batches WHERE source = 'clicks' ORDER BY start_offset "
        "LIMIT 1 OFFSET 2); SET session_replication_role = origin",
        "ledger-gap", "pgstream.batches",
    ),
    "overlapping-ledger-row": (
        "SET session_replication_role = replica; "
        "INSERT INTO pgstream.batches (job, source, partition, start_offset, end_offset, "
        "prev_end_offset, epoch, worker, records_in, records_out, dead_letters) "
        "SELECT job, source, partition, start_offset + 1, end_offset + 1, start_offset + 1, "
        "epoch, 'forger', records_in, 0, 0 FROM pgstream.batches WHERE source = 'orders' "
        "ORDER BY start_offset LIMIT 1 OFFSET 3; SET session_replication_role = origin",
        "ledger-overlap", "pgstream.batches",
    ),
    "delete-dead-letter": (
        "DELETE FROM pgstream.dead_letters WHERE id = (SELECT min(id) FROM "
        "pgstream.dead_letters WHERE operator = 'decode')",
        "lost", "pgstream.dead_letters",
    ),
    "dead-letter-for-good-record": (
        "INSERT INTO pgstream.dead_letters (job, source, partition, \"offset\", error) "
        "SELECT 'audit', 'orders', '0', min(_offset), 'forged' FROM facts "
        "WHERE _source = 'orders'",
        "unexpected", "pgstream.dead_letters",
    ),
    "committed-offset-moved-back": (
        "SET session_replication_role = replica; "
        "UPDATE pgstream.partitions SET committed_offset = committed_offset - 5 "
        "WHERE source = 'orders'; SET session_replication_role = origin",
        "unexpected", "facts",
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_tampering_is_named(job: Setup, name: str) -> None:
    stmt, kind, sink = TAMPERING[name]
    with job.conn() as conn:
        for part in stmt.split("; "):
            conn.execute(part)
    report = job.verify()
    assert not report.ok
    found = [v for v in report.violations if v.kind == kind and v.sink == sink]
    assert found, f"{name}: no {kind} on {sink} in:\n" + "\n".join(
        v.describe() for v in report.violations
    )
    code, out = job.cli()
    assert code == 1, out
    assert kind in out and sink in out


def test_clean_in_another_session_time_zone(job: Setup) -> None:
    with job.conn() as conn:
        name = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{name}" SET timezone = \'Asia/Kolkata\'')
    report = job.verify()
    assert report.ok, "\n".join(v.describe() for v in report.violations)


def test_report_names_partition_and_offset(job: Setup) -> None:
    with job.conn() as conn:
        row = conn.execute(
            "DELETE FROM facts WHERE _source = 'clicks' AND _seq = 0 AND _offset = "
            "(SELECT max(_offset) FROM facts WHERE _source = 'clicks') RETURNING _offset"
        ).fetchone()
    assert row is not None
    report = job.verify()
    assert [(v.kind, v.sink, v.source, v.partition, v.offset) for v in report.violations] == [
        ("lost", "facts", "clicks", "0", row[0])
    ]


def _cannot(job: Setup) -> str:
    with pytest.raises(CannotVerify) as info:
        job.verify()
    code, out = job.cli()
    assert code == 2, out
    assert "cannot verify" in out
    return str(info.value)


def test_truncated_file_cannot_be_checked(job: Setup) -> None:
    data = job.clicks.read_bytes()
    job.clicks.write_bytes(data[: len(data) // 2])
    assert "no longer holds" in _cannot(job) or "truncated" in _cannot(job)


def test_deleted_source_rows_cannot_be_checked(job: Setup) -> None:
    with job.conn() as conn:
        conn.execute("DELETE FROM orders WHERE id BETWEEN 100 AND 120")
    assert "no longer holds" in _cannot(job)


def test_missing_sink_table_cannot_be_checked(job: Setup) -> None:
    with job.conn() as conn:
        conn.execute("DROP TABLE last_order")
    assert "last_order" in _cannot(job)


def test_job_with_nothing_committed_is_clean(pg_dsn: str, tmp_path: Path) -> None:
    s = Setup(pg_dsn, tmp_path)
    with s.conn() as conn:
        conn.execute(DDL)
    s.clicks.write_bytes(b"")
    report = s.verify()
    assert report.ok and report.partitions == 0


def test_skipped_records_are_lost(job: Setup) -> None:
    # as if the runtime had skipped a record: the ledger counts fewer records than exist
    with job.conn() as conn:
        conn.execute(
            "UPDATE pgstream.batches SET records_in = records_in - 1 WHERE (source, "
            "start_offset) = (SELECT source, min(start_offset) FROM pgstream.batches "
            "WHERE source = 'orders' GROUP BY source)"
        )
    report = job.verify()
    assert [v.kind for v in report.violations] == ["lost"]
    assert "skipped" in report.violations[0].detail
    # the first batch of a table starts at -2**63 in the ledger: the line shows real offsets
    line = report.violations[0].describe()
    assert "-9223372036854775808" not in line
    assert re.search(r"orders/0 offset 1: batch \[1, \d+\) processed \d+ records", line), line


UNSAFE_APP = """
import pgstream as ps

app = ps.App("unsafe", max_interval=0.0)
manual = app.stream(
    "manual", ps.TableSource("manual", offset_column="id", unsafe_offsets_may_skip_rows=True)
)
manual.map(lambda r: {"id": r["id"]}).to_table("manual_out")
"""


def test_unsafe_offsets_skip_is_reported_with_a_real_range(pg_dsn: str, tmp_path: Path) -> None:
    """Under the opt-in, a row committed later with a smaller id is skipped (exit 0); verify
    names it as lost, with the batch's real offsets instead of the -2**63 sentinel."""
    (tmp_path / "unsafe_app.py").write_text(UNSAFE_APP)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE manual (id bigint PRIMARY KEY);"
            "CREATE TABLE manual_out (id bigint, _source text, _partition text, _offset bigint,"
            " _seq int, UNIQUE (_offset, _seq, _source, _partition));"
            "INSERT INTO manual SELECT i FROM generate_series(1, 10) i WHERE i <> 4"
        )
        runner = CliRunner()
        target = f"{tmp_path / 'unsafe_app.py'}:app"
        run = runner.invoke(main, ["run", target, "--dsn", pg_dsn, "--stop-when-idle"])
        assert run.exit_code == 0, run.output
        conn.execute("INSERT INTO manual VALUES (4)")  # committed later, smaller id
        run = runner.invoke(main, ["run", target, "--dsn", pg_dsn, "--stop-when-idle"])
        assert run.exit_code == 0, run.output
        assert conn.execute("SELECT count(*) FROM manual_out").fetchone() == (9,)
    res = runner.invoke(main, ["verify", target, "--dsn", pg_dsn])
    assert res.exit_code == 1, res.output
    assert "-9223372036854775808" not in res.output
    assert re.search(
        r"lost +pgstream\.batches manual/0 offset 1: batch \[1, 11\) processed 9 records but "
        r"the source holds 10 there: 1 record\(s\) were skipped",
        res.output,
    ), res.output
    assert re.search(r"lost +manual_out manual/0 offset 4", res.output), res.output


@pytest.mark.parametrize(
    ("expected", "actual", "same"),
    [
        (1, 1.0, True),
        (0.1 + 0.2, 0.3, True),
        (5, __import__("decimal").Decimal("5.000"), True),
        (1.5, 1.6, False),
        ("2024-01-01T00:00:00+00:00",
         __import__("datetime").datetime(2024, 1, 1, tzinfo=__import__("datetime").timezone.utc),
         True),
        ({"a": [1, 2]}, {"a": [1, 2.0]}, True),
        (None, 0, False),
        (True, 1, True),
        ("x", "y", False),
    ],
)
def test_values_equal(expected: Any, actual: Any, same: bool) -> None:
    assert values_equal(expected, actual) is same


@pytest.mark.parametrize("pushdown", [False, True])
def test_avg_over_numeric_verifies_clean(pg_dsn: str, pushdown: bool) -> None:
    """An average of numeric amounts is stored as PostgreSQL rounds the division (16
    fractional digits); verify recomputes it with Python's 28 digits: the same quotient, not
    a wrong value."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE pays (id bigserial PRIMARY KEY, who text NOT NULL, "
            "amount numeric(12, 2) NOT NULL)"
        )
        conn.execute(
            "INSERT INTO pays (who, amount) SELECT 'u' || (i % 7), (i % 13) + 0.01 "
            "FROM generate_series(1, 500) AS i"
        )
        conn.execute(
            "CREATE TABLE per_who (who text PRIMARY KEY, n bigint NOT NULL, mean numeric, "
            "_mean_sum numeric, _mean_count bigint NOT NULL DEFAULT 0)"
        )
    app = ps.App("avgnum", batch_size=120, pushdown=pushdown)
    app.stream("pays", ps.TableSource("pays")).key_by("who").aggregate(
        n=ps.count(), mean=ps.avg("amount")
    ).to_table("per_who")
    run_app(app, pg_dsn, stop_when_idle=True)
    report = verify_app(app, pg_dsn)
    assert report.ok, report

"""pgstream's Alembic migrations produce exactly ``pgstream.db.tables`` and enforce the ledger."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from pgstream.db import migrate
from pgstream.db.connect import connect, sqlalchemy_url
from pgstream.db.tables import SCHEMA, metadata
from pgstream.errors import DatabaseError

Snapshot = dict[str, list[tuple[Any, ...]]]


def snapshot(dsn: str) -> Snapshot:
    """The pgstream schema as PostgreSQL itself describes it (minus Alembic's version table)."""
    queries = {
        "columns": """
            SELECT table_name, ordinal_position, column_name, data_type, is_nullable,
                   column_default
            FROM information_schema.columns
            WHERE table_schema = %(s)s AND table_name <> 'alembic_version'
            ORDER BY 1, 2""",
        "constraints": """
            SELECT c.conrelid::regclass::text, c.conname, c.contype,
                   pg_get_constraintdef(c.oid)
            FROM pg_constraint c
            WHERE c.connamespace = %(s)s::regnamespace
              AND c.conrelid IS DISTINCT FROM to_regclass(%(s)s || '.alembic_version')
            ORDER BY 1, 2""",
        "indexes": """
            SELECT tablename, indexname, indexdef FROM pg_indexes
            WHERE schemaname = %(s)s AND tablename <> 'alembic_version'
            ORDER BY 1, 2""",
        "relations": """
            SELECT relname, relkind, reloptions FROM pg_class
            WHERE relnamespace = %(s)s::regnamespace
              AND relname NOT IN ('alembic_version', 'alembic_version_pkc')
            ORDER BY 1""",
    }
    with connect(dsn, autocommit=True) as conn:
        return {
            key: [tuple(row) for row in conn.execute(query, {"s": SCHEMA}).fetchall()]
            for key, query in queries.items()
        }


def schema_exists(dsn: str) -> bool:
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", [SCHEMA]).fetchone()
    return bool(row and row[0])


def create_all(dsn: str) -> None:
    """Build the schema straight from the SQLAlchemy metadata (the source of truth)."""
    engine = create_engine(sqlalchemy_url(dsn), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
            metadata.create_all(conn)
    finally:
        engine.dispose()


# --- (a) no drift --------------------------------------------------------------------------


def test_autogenerate_finds_no_drift(pg_dsn: str) -> None:
    assert migrate.schema_diff(pg_dsn) == []


def test_migrated_schema_equals_metadata_create_all(pg_dsn: str, pg_empty_dsn: str) -> None:
    # Autogenerate ignores check constraints, index predicates and storage parameters;
    # comparing the catalogs against metadata.create_all covers those too.
    create_all(pg_empty_dsn)
    migrated = snapshot(pg_dsn)
    assert migrated == snapshot(pg_empty_dsn)
    tables = {name for name, kind, _ in migrated["relations"] if kind == "r"}
    assert tables == {t.name for t in metadata.sorted_tables}
    options = {name: opts for name, kind, opts in migrated["relations"] if kind == "r"}
    assert options["partitions"] == ["fillfactor=50"]
    assert options["state"] == ["fillfactor=70"]
    indexes = {name: definition for _, name, definition in migrated["indexes"]}
    assert "WHERE (prev_end_offset IS NULL)" in indexes["batches_one_first_per_partition"]


def test_schema_diff_sees_drift_in_pgstream_only(
    pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    dsn = pg_dsn
    pg_conn.execute("CREATE TABLE public.user_orders (id bigint PRIMARY KEY)")
    assert migrate.schema_diff(dsn) == []  # user tables are never pgstream's business
    pg_conn.execute(
        sql.SQL("ALTER TABLE {} ADD COLUMN extra int").format(sql.Identifier(SCHEMA, "workers"))
    )
    diff = migrate.schema_diff(dsn)
    assert diff and diff[0][0] == "remove_column"


# --- (b) round trip --------------------------------------------------------------------------


def test_upgrade_downgrade_upgrade_round_trip(pg_dsn: str) -> None:
    before = snapshot(pg_dsn)
    with connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.user_orders (id bigint PRIMARY KEY)")
        conn.execute("INSERT INTO public.user_orders VALUES (1)")

    migrate.downgrade(pg_dsn, "base")
    assert migrate.current(pg_dsn) is None
    assert not schema_exists(pg_dsn)

    migrate.upgrade(pg_dsn)
    assert migrate.current(pg_dsn) == migrate.head()
    assert snapshot(pg_dsn) == before
    assert migrate.schema_diff(pg_dsn) == []
    with connect(pg_dsn, autocommit=True) as conn:  # the user's table was left alone
        assert conn.execute("SELECT count(*) FROM public.user_orders").fetchone() == (1,)


def test_downgrade_keeps_schema_holding_foreign_objects(pg_dsn: str) -> None:
    with connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(SCHEMA, "mine")))
    migrate.downgrade(pg_dsn, "base")
    assert migrate.current(pg_dsn) is None
    assert schema_exists(pg_dsn)  # not ours to drop: it holds a table pgstream did not make
    migrate.upgrade(pg_dsn)
    assert migrate.current(pg_dsn) == migrate.head()


def test_upgrade_on_fresh_database_then_idempotent(pg_empty_dsn: str) -> None:
    assert migrate.current(pg_empty_dsn) is None
    migrate.upgrade(pg_empty_dsn)
    migrate.upgrade(pg_empty_dsn)
    assert migrate.current(pg_empty_dsn) == migrate.head()
    with connect(pg_empty_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT to_regclass('pgstream.alembic_version') IS NOT NULL,"
            " to_regclass('public.alembic_version') IS NULL"
        ).fetchone()
    assert row == (True, True)


def test_concurrent_upgrades_from_several_processes_are_safe(pg_empty_dsn: str) -> None:
    code = "import sys; from pgstream.db import migrate; migrate.upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, pg_empty_dsn],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    assert migrate.current(pg_empty_dsn) == migrate.head()
    assert migrate.schema_diff(pg_empty_dsn) == []


def test_concurrent_upgrades_from_several_threads_are_safe(pg_empty_dsn: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            migrate.upgrade(pg_empty_dsn)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert migrate.current(pg_empty_dsn) == migrate.head()


# --- (c) current / head ------------------------------------------------------------------------


def test_current_is_head(pg_dsn: str) -> None:
    assert migrate.head() == "0008_rebuild"
    assert migrate.current(pg_dsn) == migrate.head()


def test_0002_keeps_data_and_cascades_renames(pg_empty_dsn: str) -> None:
    """A database with a committed ledger at 0001 upgrades in place; renaming a stream's
    partition row then moves its whole ledger chain in one statement."""
    migrate.upgrade(pg_empty_dsn, "0001_initial")
    with connect(pg_empty_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgstream.partitions (job, source, partition, committed_offset) "
            "VALUES ('shop', 'orders', '0', 30)"
        )
        for start, end, prev in ((0, 10, None), (10, 20, 10), (20, 30, 20)):
            conn.execute(
                "INSERT INTO pgstream.batches (job, source, partition, start_offset, end_offset,"
                " prev_end_offset, epoch, worker, records_in, records_out, dead_letters)"
                " VALUES ('shop', 'orders', '0', %s, %s, %s, 1, 'w', 10, 10, 0)",
                [start, end, prev],
            )
    migrate.upgrade(pg_empty_dsn)
    with connect(pg_empty_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT source_identity, committed_offset FROM pgstream.partitions"
        ).fetchone()
        assert row == (None, 30)
        conn.execute("UPDATE pgstream.partitions SET source = 'orders_v2' WHERE source = 'orders'")
        chain = conn.execute(
            "SELECT source, start_offset, plan_version FROM pgstream.batches ORDER BY 2"
        ).fetchall()
        assert chain == [("orders_v2", 0, None), ("orders_v2", 10, None), ("orders_v2", 20, None)]
    migrate.downgrade(pg_empty_dsn, "0001_initial")
    assert migrate.current(pg_empty_dsn) == "0001_initial"


def test_script_location_has_env_and_versions() -> None:
    location = migrate.script_location()
    assert (location / "env.py").is_file()
    assert (location / "script.py.mako").is_file()
    assert any(location.glob("versions/0001_*.py"))


# --- (d) ensure_migrated -----------------------------------------------------------------------


def test_ensure_migrated_passes_at_head(pg_conn: psycopg.Connection[Any]) -> None:
    migrate.ensure_migrated(pg_conn)


def test_ensure_migrated_rejects_unmigrated_database(pg_empty_dsn: str) -> None:
    with connect(pg_empty_dsn, autocommit=True) as conn:
        with pytest.raises(DatabaseError) as info:
            migrate.ensure_migrated(conn)
        dbname = conn.info.dbname
    message = str(info.value)
    assert "pgstream db upgrade" in message
    assert "--dsn" in message
    assert dbname in message
    assert "None" in message and migrate.head() in message


def test_ensure_migrated_on_non_autocommit_connection_leaves_it_usable(
    pg_empty_dsn: str,
) -> None:
    with connect(pg_empty_dsn) as conn:
        with pytest.raises(DatabaseError):
            migrate.ensure_migrated(conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_ensure_migrated_rejects_unknown_newer_revision(pg_conn: psycopg.Connection[Any]) -> None:
    pg_conn.execute("UPDATE pgstream.alembic_version SET version_num = '9999_future'")
    with pytest.raises(DatabaseError, match="does not know"):
        migrate.ensure_migrated(pg_conn)


# --- (e) the ledger constraints ------------------------------------------------------------


JOB, SRC = "job", "src"


def add_batch(
    conn: psycopg.Connection[Any],
    start: int,
    end: int,
    prev: int | None,
    partition: str = "0",
) -> None:
    conn.execute(
        """
        INSERT INTO pgstream.batches
            (job, source, partition, start_offset, end_offset, prev_end_offset,
             epoch, worker, records_in, records_out, dead_letters)
        VALUES (%s, %s, %s, %s, %s, %s, 1, 'w1', 1, 1, 0)
        """,
        [JOB, SRC, partition, start, end, prev],
    )


@pytest.fixture
def ledger(pg_conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """A partition with the chain [0,10) -> [10,20)."""
    for partition in ("0", "1"):
        pg_conn.execute(
            "INSERT INTO pgstream.partitions (job, source, partition) VALUES (%s, %s, %s)",
            [JOB, SRC, partition],
        )
    add_batch(pg_conn, 0, 10, None)
    add_batch(pg_conn, 10, 20, 10)
    return pg_conn


def test_ledger_accepts_a_contiguous_chain(ledger: psycopg.Connection[Any]) -> None:
    add_batch(ledger, 20, 35, 20)
    add_batch(ledger, 100, 110, None, partition="1")  # each partition has its own first
    rows = ledger.execute(
        "SELECT start_offset, end_offset FROM pgstream.batches WHERE partition = '0'"
        " ORDER BY start_offset"
    ).fetchall()
    assert rows == [(0, 10), (10, 20), (20, 35)]


@pytest.mark.parametrize(
    ("start", "end", "prev", "violation"),
    [
        # overlapping ranges
        (10, 20, 10, psycopg.errors.UniqueViolation),  # the same batch again
        (10, 25, 10, psycopg.errors.UniqueViolation),  # same start, longer
        (5, 15, 5, psycopg.errors.ForeignKeyViolation),  # starts inside [0,10)
        (15, 20, 15, psycopg.errors.UniqueViolation),  # same end, starts inside
        (15, 25, 15, psycopg.errors.ForeignKeyViolation),  # starts inside [10,20)
        (5, 25, None, psycopg.errors.UniqueViolation),  # a second "first" batch spanning
        (10, 15, 0, psycopg.errors.CheckViolation),  # claims a predecessor it does not follow
        # gaps
        (25, 30, 25, psycopg.errors.ForeignKeyViolation),  # nothing ends at 25
        (25, 30, 20, psycopg.errors.CheckViolation),  # prev end != start
        # a second first batch (no predecessor) after the chain
        (20, 30, None, psycopg.errors.UniqueViolation),
        (100, 110, None, psycopg.errors.UniqueViolation),
        # empty or inverted ranges
        (20, 20, 20, psycopg.errors.CheckViolation),
        (20, 15, 20, psycopg.errors.CheckViolation),
    ],
)
def test_ledger_rejects_overlaps_gaps_second_first_and_empty_ranges(
    ledger: psycopg.Connection[Any],
    start: int,
    end: int,
    prev: int | None,
    violation: type[psycopg.errors.IntegrityError],
) -> None:
    with pytest.raises(psycopg.errors.IntegrityError) as info:
        add_batch(ledger, start, end, prev)
    assert isinstance(info.value, violation)


def test_ledger_rejects_a_first_batch_with_an_empty_range(pg_conn: psycopg.Connection[Any]) -> None:
    pg_conn.execute(
        "INSERT INTO pgstream.partitions (job, source, partition) VALUES (%s, %s, '0')",
        [JOB, SRC],
    )
    with pytest.raises(psycopg.errors.CheckViolation):
        add_batch(pg_conn, 7, 7, None)


def test_ledger_requires_the_partition_row(pg_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        add_batch(pg_conn, 0, 10, None)


def test_deleting_a_partition_removes_its_ledger(ledger: psycopg.Connection[Any]) -> None:
    ledger.execute("DELETE FROM pgstream.partitions WHERE partition = '0'")
    assert ledger.execute("SELECT count(*) FROM pgstream.batches").fetchone() == (0,)

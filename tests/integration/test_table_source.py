"""TableSource against a real PostgreSQL: the safe horizon (invariant 6), validation, names."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgstream.errors import ConfigError
from pgstream.sources.base import OpenContext, ReadResult, SourceError
from pgstream.sources.table import MIN_OFFSET, TableReader, TableSource, parse_table_name


@pytest.fixture
def scratch_dsn(pg_empty_dsn: str) -> str:
    """A fresh, empty database on the test server (conftest: the session's server, whichever
    it is), dropped afterwards."""
    return pg_empty_dsn


@pytest.fixture
def db(scratch_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(scratch_dsn, autocommit=True) as conn:
        yield conn


def _orders(db: psycopg.Connection[Any]) -> None:
    db.execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id text, amount numeric,"
        " note text DEFAULT '')"
    )


def _read_until(
    reader: TableReader,
    start: int,
    done: Callable[[list[int]], bool],
    *,
    max_records: int = 1000,
    timeout: float = 20.0,
) -> tuple[list[int], int]:
    out: list[int] = []
    deadline = time.monotonic() + timeout
    while not done(out):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; got {out}")
        res = reader.read(start, max_records)
        _check_result(res, start)
        out += [r.offset for r in res.records]
        start = res.end
        if not res.records:
            time.sleep(0.01)
    return out, start


def _check_result(res: ReadResult, start: int) -> None:
    offs = [r.offset for r in res.records]
    assert offs == sorted(offs) and len(set(offs)) == len(offs)
    assert all(o >= start for o in offs)
    assert res.end == (offs[-1] + 1 if offs else start)


def test_reads_rows_as_dicts(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    db.execute(
        "INSERT INTO orders (user_id, amount) SELECT 'u' || i, i FROM generate_series(1, 25) i"
    )
    src = TableSource("public.orders", offset_column="id")
    assert src.kind == "table" and src.describe() == "table public.orders"
    assert src.partitions(db) == ["0"] and src.initial_offset("0") == MIN_OFFSET
    src.validate(db)
    reader = src.open("0", OpenContext(scratch_dsn))
    try:
        res = reader.read(MIN_OFFSET, 10)
        assert [r.offset for r in res.records] == list(range(1, 11))
        assert res.records[0].value == {"id": 1, "user_id": "u1", "amount": 1, "note": ""}
        assert res.end == 11 and res.head == 26
        res = reader.read(res.end, 100)
        assert [r.offset for r in res.records] == list(range(11, 26)) and res.end == 26
        res = reader.read(26, 100)
        assert res.records == [] and res.end == 26
        assert reader.head() == 26
        # replay from the middle
        assert [r.offset for r in reader.read(5, 2).records] == [5, 6]
    finally:
        reader.close()


def test_columns_subset(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    db.execute("INSERT INTO orders (user_id, amount) VALUES ('a', 1), ('b', 2)")
    src = TableSource("orders", columns=["user_id"])
    src.validate(db)
    reader = src.open("0", OpenContext(scratch_dsn))
    res = reader.read(MIN_OFFSET, 10)
    assert [(r.offset, r.value) for r in res.records] == [
        (1, {"user_id": "a"}),
        (2, {"user_id": "b"}),
    ]
    reader.close()
    reader = TableSource("orders", columns=["id", "amount"]).open("0", OpenContext(scratch_dsn))
    assert reader.read(MIN_OFFSET, 1).records[0].value == {"id": 1, "amount": 1}
    reader.close()


def test_empty_table(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    res = reader.read(MIN_OFFSET, 10)
    assert res.records == [] and res.end == MIN_OFFSET and res.head is None
    assert reader.head() is None
    reader.close()


def test_open_transaction_holds_back_later_ids(
    scratch_dsn: str, db: psycopg.Connection[Any]
) -> None:
    """A takes id 1 and holds its transaction; B commits 2..11; nothing returned until A commits."""
    _orders(db)
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    with psycopg.connect(scratch_dsn) as a:
        row = a.execute("INSERT INTO orders (user_id) VALUES ('A') RETURNING id").fetchone()
        assert row == (1,)
        db.execute("INSERT INTO orders (user_id) SELECT 'B' FROM generate_series(1, 10)")
        start = MIN_OFFSET
        for _ in range(5):
            res = reader.read(start, 100)
            assert res.records == [], "read past an in-flight id"
            assert res.end == start
            time.sleep(0.02)
        a.commit()
    got, end = _read_until(reader, start, lambda out: len(out) >= 11)
    assert got == list(range(1, 12)) and end == 12
    # nothing more, and nothing twice
    assert reader.read(end, 100).records == []
    reader.close()


def test_horizon_holders_name_the_open_transaction(
    scratch_dsn: str, db: psycopg.Connection[Any], pg_server_dsn: str
) -> None:
    """An idle transaction that inserted (a nextval() id) holds the horizon: the reader names
    its session; a transaction elsewhere in the cluster is not named."""
    _orders(db)
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    try:
        assert reader.horizon_holders() == []
        with (
            psycopg.connect(scratch_dsn, application_name="slow-writer") as a,
            psycopg.connect(pg_server_dsn) as other,
        ):
            other.execute("SELECT pg_current_xact_id()")  # another database: not a holder
            a.execute("INSERT INTO orders (user_id) VALUES ('A')\n-- second line")
            db.execute("INSERT INTO orders (user_id) SELECT 'B' FROM generate_series(1, 5)")
            assert reader.read(MIN_OFFSET, 100).records == []
            (holder,) = reader.horizon_holders()
            assert holder.pid == a.info.backend_pid
            assert holder.application_name == "slow-writer"
            assert holder.state == "idle in transaction"
            assert holder.writes_table and holder.holds_xid
            assert holder.query == "INSERT INTO orders (user_id) VALUES ('A')"
            assert holder.xact_age_seconds is not None and holder.xact_age_seconds >= 0
            assert f"pid {holder.pid} (slow-writer), idle in transaction" in holder.describe()
            # the same through the source, and filtered by age
            assert [h.pid for h in TableSource("orders").horizon_holders(scratch_dsn)] == [
                holder.pid
            ]
            assert TableSource("orders").horizon_holders(scratch_dsn, min_age=3600) == []
            a.commit()
            other.rollback()
        assert reader.horizon_holders() == []
        got, _ = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 6)
        assert got == list(range(1, 7))
    finally:
        reader.close()


def test_id_drawn_before_xid_is_not_skipped(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    """The id is drawn before the inserting transaction has an xid (a slow BEFORE trigger here).

    An xid-only horizon sees ``xmin == xmax`` and would return id 2, skipping id 1 forever.
    """
    _orders(db)
    db.execute(
        """
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.note = 'slow' THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION slow();
        """
    )
    # The first nextval() of a sequence is WAL-logged, which gives the transaction an xid; draw
    # one value here so that the next ones are not (only every 32nd is).
    db.execute("SELECT nextval('orders_id_seq')")
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))

    def slow_insert() -> None:
        with psycopg.connect(scratch_dsn, autocommit=True) as c:
            c.execute("INSERT INTO orders (note) VALUES ('slow')")

    t = threading.Thread(target=slow_insert)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while db.execute("SELECT last_value FROM orders_id_seq").fetchone() != (2,):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        db.execute("INSERT INTO orders (note) VALUES ('fast')")  # id 3, committed first
        assert db.execute("SELECT array_agg(id) FROM orders").fetchone() == ([3],)
        for _ in range(3):
            res = reader.read(MIN_OFFSET, 100)
            assert res.records == [], "returned id 3 while id 2 was still being inserted"
    finally:
        t.join()
    got, _ = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 2)
    assert got == [2, 3]
    reader.close()


def test_id_drawn_in_earlier_statement_with_xid_is_not_skipped(
    scratch_dsn: str, db: psycopg.Connection[Any]
) -> None:
    """A transaction that already holds an xid draws an id with a separate nextval() and inserts
    it later: covered by the xid part of the horizon (it holds no lock on the table yet)."""
    _orders(db)
    db.execute("CREATE TABLE other (x int)")
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    with psycopg.connect(scratch_dsn) as a:
        a.execute("INSERT INTO other VALUES (1)")  # a has an xid now
        (k,) = a.execute("SELECT nextval('orders_id_seq')").fetchone() or (None,)
        db.execute("INSERT INTO orders (user_id) VALUES ('B')")  # k + 1, committed
        for _ in range(3):
            assert reader.read(MIN_OFFSET, 100).records == []
        a.execute("INSERT INTO orders (id, user_id) VALUES (%s, 'A')", [k])
        a.commit()
    got, _ = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 2)
    assert got == [k, k + 1]
    reader.close()


def test_long_transaction_in_another_database_does_not_stall(
    scratch_dsn: str, db: psycopg.Connection[Any], pg_server_dsn: str
) -> None:
    _orders(db)
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    with psycopg.connect(pg_server_dsn) as other:
        other.execute("SELECT pg_current_xact_id()")  # holds an xid (the cluster's xmin)
        db.execute("INSERT INTO orders (user_id) VALUES ('a'), ('b')")
        got, _ = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 2, timeout=5)
        assert got == [1, 2]
        other.rollback()
    reader.close()


def test_partition_writers_hold_back(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    """Inserting straight into a partition (with no xid yet) also holds the horizon back."""
    db.execute(
        """
        CREATE SEQUENCE ev_seq;
        CREATE TABLE ev (id bigint NOT NULL DEFAULT nextval('ev_seq'), note text)
          PARTITION BY RANGE (id);
        CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM (MINVALUE) TO (MAXVALUE);
        CREATE INDEX ON ev (id);
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.note = 'slow' THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE INSERT ON ev_1 FOR EACH ROW EXECUTE FUNCTION slow();
        """
    )
    db.execute("SELECT nextval('ev_seq')")  # see test_id_drawn_before_xid_is_not_skipped
    reader = TableSource("ev").open("0", OpenContext(scratch_dsn))

    def slow_insert() -> None:
        with psycopg.connect(scratch_dsn, autocommit=True) as c:
            c.execute("INSERT INTO ev_1 (id, note) VALUES (nextval('ev_seq'), 'slow')")

    t = threading.Thread(target=slow_insert)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while db.execute("SELECT last_value FROM ev_seq").fetchone() != (2,):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        db.execute("INSERT INTO ev (note) VALUES ('fast')")
        for _ in range(3):
            assert reader.read(MIN_OFFSET, 100).records == []
    finally:
        t.join()
    got, _ = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 2)
    assert got == [2, 3]
    reader.close()


def test_concurrent_writers_randomized(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    """Writers hold transactions open, sleep inside them, roll back sometimes, use COPY and a
    slow trigger; a reader following its own end offsets sees every committed id exactly once."""
    _orders(db)
    db.execute(
        """
        CREATE FUNCTION slowish() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.note = 'slow' THEN PERFORM pg_sleep(random() * 0.02); END IF;
        RETURN NEW; END $$;
        CREATE TRIGGER slowish BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION slowish();
        """
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with psycopg.connect(scratch_dsn) as c:
                while not stop.is_set():
                    kind = rnd.random()
                    if kind < 0.15:
                        with c.cursor().copy("COPY orders (user_id, note) FROM STDIN") as cp:
                            for _ in range(rnd.randint(1, 50)):
                                cp.write_row([f"w{seed}", "copy"])
                                if rnd.random() < 0.05:
                                    time.sleep(0.002)
                    else:
                        for _ in range(rnd.randint(1, 3)):
                            note = "slow" if rnd.random() < 0.2 else ""
                            c.execute(
                                "INSERT INTO orders (user_id, note) VALUES (%s, %s)",
                                [f"w{seed}", note],
                            )
                            time.sleep(rnd.random() * 0.01)
                    time.sleep(rnd.random() * 0.02)
                    if rnd.random() < 0.1:
                        c.rollback()
                    else:
                        c.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    seen: list[int] = []
    start = MIN_OFFSET
    rnd = random.Random(1)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    t_end = time.monotonic() + 4.0
    while time.monotonic() < t_end:
        res = reader.read(start, rnd.randint(1, 60))
        _check_result(res, start)
        seen += [r.offset for r in res.records]
        start = res.end
        time.sleep(rnd.random() * 0.005)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    committed = [r[0] for r in db.execute("SELECT id FROM orders ORDER BY id").fetchall()]
    assert len(committed) > 200
    rest, _ = _read_until(reader, start, lambda out: len(seen) + len(out) >= len(committed))
    seen += rest
    assert seen == committed
    assert reader.read(committed[-1] + 1, 100).records == []
    reader.close()


def test_catching_up_in_batches(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    db.execute("INSERT INTO orders (user_id) SELECT 'u' FROM generate_series(1, 5000)")
    db.execute("DELETE FROM orders WHERE id % 7 = 0")  # gaps (like rolled-back ids)
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    got, _ = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 5000 - 714, max_records=333)
    assert got == [i for i in range(1, 5001) if i % 7]
    reader.close()


def test_reads_use_an_index_range_scan(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    db.execute("INSERT INTO orders (user_id) SELECT 'u' FROM generate_series(1, 20000)")
    db.execute("ANALYZE orders")
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    plan = "\n".join(
        r[0]
        for r in db.execute(
            sql.SQL("EXPLAIN ") + reader._q_rows,
            [100, 20000, 500],
        ).fetchall()
    )
    assert "Index Scan using orders_pkey" in plan, plan
    reader.close()


def test_reconnects_after_lost_connection(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    db.execute("INSERT INTO orders (user_id) VALUES ('a'), ('b')")
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    assert [r.offset for r in reader.read(MIN_OFFSET, 1).records] == [1]
    assert reader._conn is not None
    pid = reader._conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", [pid])
    time.sleep(0.1)
    assert [r.offset for r in reader.read(2, 10).records] == [2]
    assert reader._conn.info.backend_pid != pid
    reader.close()


def test_sequence_reset_fails_loudly(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    db.execute("INSERT INTO orders (user_id) SELECT 'u' FROM generate_series(1, 10)")
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    _, end = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 10)
    # consumers that delete what they have read (a queue table) are fine
    db.execute("DELETE FROM orders")
    assert reader.read(end, 10).records == []
    db.execute("INSERT INTO orders (user_id) VALUES ('x')")
    got, end = _read_until(reader, end, lambda out: len(out) >= 1)
    assert got == [11]
    # ... but a table recreated / sequence reset must not be silently skipped
    db.execute("TRUNCATE orders RESTART IDENTITY")
    db.execute("INSERT INTO orders (user_id) VALUES ('new')")
    with pytest.raises(SourceError, match=r"offsets jumped.*committed offset 12"):
        reader.read(end, 10)
    reader.close()


def test_validate_errors(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    db.execute("CREATE TABLE texty (id text PRIMARY KEY)")
    db.execute("CREATE TABLE cached (id bigint GENERATED ALWAYS AS IDENTITY (CACHE 20))")
    with pytest.raises(SourceError, match=r"'nope' does not exist.*search_path"):
        TableSource("nope").validate(db)
    with pytest.raises(SourceError, match=r"'nosuch\.orders' does not exist.*schema 'nosuch'"):
        TableSource("nosuch.orders").validate(db)
    with pytest.raises(SourceError, match=r"no offset column 'seq'.*offset_column="):
        TableSource("orders", offset_column="seq").validate(db)
    with pytest.raises(
        SourceError, match=r"offset column 'id' of source table 'texty' has type text"
    ):
        TableSource("texty").validate(db)
    with pytest.raises(SourceError, match=r"no column\(s\) 'zzz'"):
        TableSource("orders", columns=["user_id", "zzz"]).validate(db)
    with pytest.raises(SourceError, match=r"CACHE 20.*CACHE 1"):
        TableSource("cached").validate(db)
    with pytest.raises(SourceError, match="does not exist"):
        TableSource("nope").open("0", OpenContext(scratch_dsn))
    # validate runs inside the caller's transaction without breaking it
    with psycopg.connect(scratch_dsn) as c:
        with pytest.raises(SourceError):
            TableSource("nope").validate(c)
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_offset_column_without_sequence_is_refused(
    scratch_dsn: str, db: psycopg.Connection[Any]
) -> None:
    """Application-filled offsets: refused like a text column, unless explicitly accepted."""
    db.execute("CREATE TABLE manual (id bigint PRIMARY KEY, v text)")
    with pytest.raises(
        SourceError,
        match=r"offset column 'id' of source table 'manual' is not filled by a sequence or "
        r"identity.*skipped for good; fix: make it bigserial.*unsafe_offsets_may_skip_rows=True",
    ):
        TableSource("manual").validate(db)


def test_unsafe_offsets_opt_in_warns_and_really_skips(
    scratch_dsn: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """With the opt-in the source runs, warns at start, and a row committed later with a
    smaller id is skipped for good: the risk the option's name states."""
    db.execute("CREATE TABLE manual (id bigint PRIMARY KEY, v text)")
    src = TableSource("manual", unsafe_offsets_may_skip_rows=True)
    with caplog.at_level("WARNING", logger="pgstream.sources.table"):
        src.validate(db)
    assert "unsafe_offsets_may_skip_rows=True" in caplog.text and "skipped" in caplog.text
    db.execute("INSERT INTO manual VALUES (1, 'a'), (2, 'b'), (5, 'e')")
    reader = src.open("0", OpenContext(scratch_dsn))
    try:
        got, end = _read_until(reader, MIN_OFFSET, lambda out: len(out) >= 3)
        assert got == [1, 2, 5] and end == 6
        db.execute("INSERT INTO manual VALUES (3, 'c')")  # committed later, smaller id
        for _ in range(3):
            assert reader.read(end, 100).records == []
    finally:
        reader.close()


def test_sequence_default_counts_as_a_sequence(
    scratch_dsn: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """DEFAULT nextval() of a sequence the column does not own is accepted, and its CACHE is
    checked like a bigserial's."""
    db.execute(
        "CREATE SEQUENCE shared_seq; CREATE SEQUENCE fast_seq CACHE 10;"
        "CREATE TABLE a (id bigint NOT NULL DEFAULT nextval('shared_seq') PRIMARY KEY);"
        "CREATE TABLE b (id bigint NOT NULL DEFAULT nextval('fast_seq') PRIMARY KEY)"
    )
    with caplog.at_level("WARNING", logger="pgstream.sources.table"):
        TableSource("a").validate(db)
    assert caplog.text == ""
    with pytest.raises(SourceError, match=r"sequence fast_seq .* has CACHE 10"):
        TableSource("b").validate(db)


def test_mixed_case_reserved_and_spaced_names(
    scratch_dsn: str, db: psycopg.Connection[Any]
) -> None:
    db.execute(
        'CREATE SCHEMA "my schema";'
        'CREATE TABLE "my schema"."Order Lines" ("Order" bigserial PRIMARY KEY, "select" text);'
        'INSERT INTO "my schema"."Order Lines" ("select") VALUES (\'x\'), (\'y\');'
    )
    name = '"my schema"."Order Lines"'
    src = TableSource(name, offset_column="Order", columns=["select"])
    src.validate(db)
    reader = src.open("0", OpenContext(scratch_dsn))
    res = reader.read(MIN_OFFSET, 10)
    assert [(r.offset, r.value) for r in res.records] == [
        (1, {"select": "x"}),
        (2, {"select": "y"}),
    ]
    assert reader.head() == 3
    reader.close()
    reader = TableSource(name, offset_column="Order").open("0", OpenContext(scratch_dsn))
    assert reader.read(MIN_OFFSET, 1).records[0].value == {"Order": 1, "select": "x"}
    reader.close()
    # the old literal spelling is refused with the quoted one as the fix, never guessed
    with pytest.raises(ConfigError, match="space outside double quotes") as info:
        TableSource("my schema.Order Lines", offset_column="Order")
    assert info.value.hint is not None and '\'"my schema"."Order Lines"\'' in info.value.hint
    # a quoted part is taken exactly: the lower-case spelling is another (missing) table
    with pytest.raises(SourceError, match=r"does not exist.*'\"my schema\"\.\"Order Lines\"'"):
        TableSource('"my schema"."order lines"', offset_column="Order").validate(db)


def test_unquoted_names_fold_to_lower_case(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    """TableSource("Amb") reads amb, like SQL; TableSource('"Amb"') reads "Amb"."""
    db.execute(
        """
        CREATE TABLE amb (id bigserial PRIMARY KEY, who text);
        CREATE TABLE "Amb" (id bigserial PRIMARY KEY, who text);
        INSERT INTO amb (who) VALUES ('lower');
        INSERT INTO "Amb" (who) VALUES ('Mixed');
        CREATE SCHEMA "Sales";
        CREATE TABLE "Sales"."Order Lines" (id bigserial PRIMARY KEY, who text);
        INSERT INTO "Sales"."Order Lines" (who) VALUES ('quoted');
        """
    )
    for name, who in [
        ("Amb", "lower"),
        ("AMB", "lower"),
        ("public.Amb", "lower"),
        ('"Amb"', "Mixed"),
        ('PUBLIC."Amb"', "Mixed"),
        ('"Sales"."Order Lines"', "quoted"),
    ]:
        src = TableSource(name)
        src.validate(db)
        reader = src.open("0", OpenContext(scratch_dsn))
        try:
            assert [r.value["who"] for r in reader.read(MIN_OFFSET, 10).records if r.value] == [
                who
            ], name
        finally:
            reader.close()


def test_missing_folded_name_hints_at_quoting(
    scratch_dsn: str, db: psycopg.Connection[Any]
) -> None:
    """Only "Amb" exists: TableSource("Amb") must not read it, and says how to quote it."""
    db.execute(
        'CREATE TABLE "Amb" (id bigserial PRIMARY KEY); CREATE SCHEMA "Sales";'
        'CREATE TABLE "Sales"."Lines" (id bigserial PRIMARY KEY)'
    )
    hint = r"a table named '\"Amb\"' exists: unquoted names fold to lower case.*'\"Amb\"'"
    with pytest.raises(SourceError, match=r"'Amb' does not exist \(looked for amb in the search"):
        TableSource("Amb").validate(db)
    with pytest.raises(SourceError, match=hint):
        TableSource("Amb").validate(db)
    with pytest.raises(SourceError, match=hint):
        TableSource("Amb").open("0", OpenContext(scratch_dsn))
    with pytest.raises(SourceError, match=r"'\"Sales\"\.\"Lines\"'"):
        TableSource("Sales.Lines").validate(db)
    with pytest.raises(SourceError, match=r"'\"Sales\"\.\"Lines\"'"):  # only the schema
        TableSource('Sales."Lines"').validate(db)
    with pytest.raises(SourceError, match=r"fix: create it"):
        TableSource("nothing_like_it").validate(db)


def test_parse_table_name() -> None:
    assert parse_table_name("orders") == (None, "orders")
    assert parse_table_name("Orders") == (None, "orders")
    assert parse_table_name("public.orders") == ("public", "orders")
    assert parse_table_name('Sales."Order Lines"') == ("sales", "Order Lines")
    assert parse_table_name('"Amb"') == (None, "Amb")
    assert parse_table_name(" public . orders ") == ("public", "orders")
    assert parse_table_name("ÄÖ.Ü") == ("ÄÖ", "Ü")  # like PostgreSQL: only ASCII folds
    assert parse_table_name('"odd.schema".t') == ("odd.schema", "t")
    assert parse_table_name('"a""b".c') == ('a"b', "c")
    for bad in ("a.b.c", ".t", "s.", "", '"unterminated', '"ab"cd', "my schema.t", 'x.""'):
        with pytest.raises(ConfigError, match="table name"):
            parse_table_name(bad)


def test_dropped_table_raises_source_error(scratch_dsn: str, db: psycopg.Connection[Any]) -> None:
    _orders(db)
    reader = TableSource("orders").open("0", OpenContext(scratch_dsn))
    reader.read(MIN_OFFSET, 10)
    db.execute("DROP TABLE orders")
    with pytest.raises(SourceError, match=r"table orders can no longer be read.*orders"):
        reader.read(MIN_OFFSET, 10)
    reader.close()


def test_split_table_partitions_hold_each_row_once_below_the_horizon(
    scratch_dsn: str, db: psycopg.Connection[Any]
) -> None:
    """4 partitions by user_id: an open transaction holds every partition back; each row is
    in exactly one partition (the documented hash), in id order; a partition with no rows
    in a long final range moves past it instead of scanning it again."""
    from pgstream.sources.table import SPLIT_SKIP_SPAN

    _orders(db)
    src = TableSource("orders", partitions=4, partition_by="user_id")
    src.validate(db)
    readers = {p: src.open(p, OpenContext(scratch_dsn)) for p in src.partitions(db)}
    with psycopg.connect(scratch_dsn) as a:
        a.execute("INSERT INTO orders (user_id) VALUES ('u0')")
        db.execute(
            "INSERT INTO orders (user_id) SELECT 'u' || (g % 13) FROM generate_series(1, 300) g"
        )
        db.execute("INSERT INTO orders (user_id) VALUES (NULL)")
        for r in readers.values():
            assert r.read(MIN_OFFSET, 100).records == []
        a.commit()
    seen: dict[int, str] = {}
    for p, r in readers.items():
        start, got = MIN_OFFSET, []
        for _ in range(50):
            res = r.read(start, 40)
            got += [x.offset for x in res.records]
            start = res.end
            if start >= 303:
                break
        assert got == sorted(got) and start == 303, (p, start)
        for off in got:
            assert off not in seen
            seen[off] = p
    assert sorted(seen) == list(range(1, 303))
    want = dict(db.execute(
        "SELECT id, abs(mod(hashtextextended(coalesce(user_id::text, ''), 0), 4))::text "
        "FROM orders"
    ).fetchall())
    assert seen == want
    # a user only in partition q: the others move past a long range of q's rows at once
    q = want[1]
    lonely = next(u for u in (f"x{i}" for i in range(100)) if db.execute(
        "SELECT abs(mod(hashtextextended(%s, 0), 4))::text", [u]).fetchone() == (q,))
    db.execute(
        "INSERT INTO orders (user_id) SELECT %s FROM generate_series(1, %s)",
        [lonely, SPLIT_SKIP_SPAN + 5],
    )
    other = next(p for p in readers if p != q)
    res = readers[other].read(303, 100)
    assert res.records == [] and res.end == 303 + SPLIT_SKIP_SPAN + 5
    with pytest.raises(SourceError, match=r"partitions 0\.\.3"):
        src.open("4", OpenContext(scratch_dsn))
    for r in readers.values():
        r.close()


def test_split_table_refuses_a_partition_by_column_it_cannot_hash_stably(
    scratch_dsn: str, db: psycopg.Connection[Any]
) -> None:
    db.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz, who text)")
    with pytest.raises(SourceError, match=r"partition_by column 'at' .* timestamp with time zone"):
        TableSource("ev", partitions=2, partition_by="at").validate(db)
    with pytest.raises(SourceError, match="no partition_by column 'nope'"):
        TableSource("ev", partitions=2, partition_by="nope").validate(db)
    TableSource("ev", partitions=2, partition_by="who").validate(db)

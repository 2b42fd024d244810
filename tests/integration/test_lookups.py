"""Table lookups on a real PostgreSQL: enrichment, each missing mode, one query per batch,
the table as of each batch's commit, clear errors at start, and verify's note."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.operators.lookup import BoundLookup
from pgstream.runtime.worker import run_app
from pgstream.verify import verify_app

N_USERS = 10
MISSING_USERS = {3, 7}  # users with no row in the lookup table

EVENTS = [{"id": i, "user_id": i % N_USERS, "amount": i % 13} for i in range(1, 301)]


def country(user: int) -> str:
    return f"c{user % 4}"


def setup_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """
        CREATE TABLE users (id bigint PRIMARY KEY, country text, tier int);
        CREATE TABLE facts (order_id bigint, user_id bigint, country text, tier int,
            _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
            _seq int NOT NULL DEFAULT 0, UNIQUE (_source, _partition, _offset, _seq));
        CREATE TABLE per_country (country text PRIMARY KEY, n bigint NOT NULL, total numeric);
        """
    )
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO users VALUES (%s, %s, %s)",
            [(u, country(u), u * 10) for u in range(N_USERS) if u not in MISSING_USERS],
        )


def write_events(path: Path, events: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def lookup_app(path: Path, missing: str, **settings: Any) -> ps.App:
    app = ps.App("enrich", **settings)
    orders = app.stream("orders", ps.FileSource(path))
    enriched = orders.filter(lambda o: o["amount"] > 0).lookup(
        "public.users", on={"user_id": "id"}, columns=["country", "tier"], missing=missing
    )
    enriched.map(
        lambda o: {k: o[k] for k in ("user_id", "country", "tier")} | {"order_id": o["id"]}
    ).to_table("facts")
    enriched.map(lambda o: {**o, "country": o["country"] or "?"}).key_by("country").aggregate(
        n=ps.count(), total=ps.sum("amount")
    ).to_table("per_country")
    return app


def expected_facts(missing: str) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in EVENTS:
        if e["amount"] <= 0:
            continue
        u = e["user_id"]
        if u in MISSING_USERS:
            if missing == "null":
                out.append((e["id"], u, None, None))
            continue
        out.append((e["id"], u, country(u), u * 10))
    return sorted(out)


def expected_countries(missing: str) -> dict[str, tuple[int, int]]:
    counts: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for oid, _user, c, _ in expected_facts(missing):
        amount = next(e["amount"] for e in EVENTS if e["id"] == oid)
        counts[c or "?"] += 1
        totals[c or "?"] += amount
    return {c: (counts[c], totals[c]) for c in counts}


def facts(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT order_id, user_id, country, tier FROM facts ORDER BY 1"
    ).fetchall()


def countries(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    rows = conn.execute("SELECT country, n, total FROM per_country").fetchall()
    return {c: (n, int(t)) for c, n, t in rows}


def dead(conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
    return conn.execute(
        "SELECT \"offset\", error FROM pgstream.dead_letters ORDER BY 1"
    ).fetchall()


@pytest.mark.parametrize("missing", ["null", "drop", "dead_letter"])
def test_lookup_enriches_each_record_once_per_mode(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, missing: str
) -> None:
    path = tmp_path / "orders.jsonl"
    write_events(path, EVENTS)
    setup_tables(pg_conn)
    run_app(lookup_app(path, missing, batch_size=40), pg_dsn, stop_when_idle=True)
    assert facts(pg_conn) == expected_facts(missing)
    assert countries(pg_conn) == expected_countries(missing)
    letters = dead(pg_conn)
    if missing == "dead_letter":
        lost = [e for e in EVENTS if e["amount"] > 0 and e["user_id"] in MISSING_USERS]
        assert len(letters) == len(lost)
        assert all("no row with id = " in err and "'public.users'" in err for _, err in letters)
    else:
        assert letters == []
    report = verify_app(lookup_app(path, missing), pg_dsn)
    assert report.ok, report.summary()
    assert any("lookup('public.users')" in note for note in report.unchecked)


def test_one_query_per_batch_and_table_as_of_commit(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "orders.jsonl"
    write_events(path, EVENTS[:150])
    setup_tables(pg_conn)
    calls: list[int] = []
    original = BoundLookup.fetch

    def counted(self: BoundLookup, cur: Any, keys: set[Any]) -> None:
        calls.append(len(keys))
        original(self, cur, keys)

    monkeypatch.setattr(BoundLookup, "fetch", counted)
    run_app(lookup_app(path, "null", batch_size=40), pg_dsn, stop_when_idle=True)
    batches = pg_conn.execute("SELECT count(*) FROM pgstream.batches").fetchone()
    # two sinks share one lookup: one query per batch transaction, never more
    assert batches is not None and len(calls) == batches[0] > 1
    assert max(calls) <= N_USERS

    # the table changes: later batches see the new row, committed rows keep what they saw
    pg_conn.execute("UPDATE users SET country = 'moved' WHERE id = 1")
    write_events(path, EVENTS)
    run_app(lookup_app(path, "null", batch_size=40), pg_dsn, stop_when_idle=True)
    got = {oid: c for oid, u, c, _ in facts(pg_conn) if u == 1}
    assert {c for oid, c in got.items() if oid <= 150} == {country(1)}
    assert {c for oid, c in got.items() if oid > 150} == {"moved"}


def test_unknown_table_or_column_is_a_clear_error(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    path = tmp_path / "orders.jsonl"
    write_events(path, EVENTS[:5])
    setup_tables(pg_conn)
    pg_conn.execute("CREATE TABLE nokey (id bigint, country text)")

    def app_for(table: str, on: Any, columns: list[str]) -> ps.App:
        app = ps.App("bad")
        app.stream("o", ps.FileSource(path)).lookup(table, on=on, columns=columns).to_table(
            "facts"
        )
        return app

    cases = [
        ("public.userz", "user_id", ["country"], "does not exist"),
        ("users", {"user_id": "id"}, ["colour"], "no column(s) 'colour'"),
        ("users", "user_id", ["country"], "no column(s) 'user_id'"),
        ("nokey", {"user_id": "id"}, ["country"], "no unique index"),
    ]
    for table, on, columns, words in cases:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            run_app(app_for(table, on, columns), pg_dsn, stop_when_idle=True)
    with pytest.raises(ConfigError, match="missing="):
        ps.App("x").stream("o", ps.FileSource(path)).lookup(
            "users", on="id", columns=["country"], missing="skip"
        )
    assert pg_conn.execute("SELECT count(*) FROM facts").fetchone() == (0,)


def test_lookup_after_lookup_and_a_record_without_the_key(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "orders.jsonl"
    events: list[dict[str, Any]] = [{"id": i, "user_id": f"u{i % 5}"} for i in range(60)]
    events[17] = {"id": 17}  # no key field: a dead letter naming it
    write_events(path, events)
    pg_conn.execute(
        """
        CREATE TABLE people (handle text PRIMARY KEY, country_id int);
        CREATE TABLE countries (id int PRIMARY KEY, name text);
        INSERT INTO people SELECT 'u' || g, g % 2 FROM generate_series(0, 3) g;
        INSERT INTO countries VALUES (0, 'zero'), (1, 'one');
        CREATE TABLE out (id bigint, name text, _source text, _partition text,
            _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq));
        """
    )
    calls: list[str] = []
    original = BoundLookup.fetch

    def counted(self: BoundLookup, cur: Any, keys: set[Any]) -> None:
        calls.append(self.lookup.table)
        original(self, cur, keys)

    monkeypatch.setattr(BoundLookup, "fetch", counted)
    app = ps.App("chain", batch_size=25)
    (
        app.stream("o", ps.FileSource(path))
        .lookup("people", on={"user_id": "handle"}, columns=["country_id"])
        .lookup("countries", on={"country_id": "id"}, columns=["name"])
        .map(lambda o: {"id": o["id"], "name": o["name"]})
        .to_table("out")
    )
    run_app(app, pg_dsn, stop_when_idle=True)
    got = dict(pg_conn.execute("SELECT id, name FROM out").fetchall())
    want = {
        e["id"]: (None if e["user_id"] == "u4" else ["zero", "one"][int(e["user_id"][1]) % 2])
        for e in events
        if "user_id" in e
    }
    assert got == want
    letters = dead(pg_conn)
    assert len(letters) == 1 and "record has no field 'user_id'" in letters[0][1]
    batches = pg_conn.execute("SELECT count(*) FROM pgstream.batches").fetchone()
    assert batches is not None
    assert calls == ["people", "countries"] * batches[0]


def test_batch_handler_sees_enriched_records(tmp_path: Path, pg_dsn: str, pg_conn: Any) -> None:
    path = tmp_path / "orders.jsonl"
    write_events(path, EVENTS[:50])
    setup_tables(pg_conn)
    pg_conn.execute("CREATE TABLE seen (order_id bigint PRIMARY KEY, country text)")
    app = ps.App("handler", batch_size=20)
    enriched = app.stream("o", ps.FileSource(path)).lookup(
        "users", on={"user_id": "id"}, columns=["country"], missing="drop"
    )

    @app.batch(enriched)
    def keep(batch: ps.Batch) -> None:
        for r in batch.records:
            batch.execute("INSERT INTO seen VALUES (%s, %s)", [r["id"], r["country"]])

    run_app(app, pg_dsn, stop_when_idle=True)
    got = dict(pg_conn.execute("SELECT order_id, country FROM seen").fetchall())
    assert got == {
        e["id"]: country(e["user_id"]) for e in EVENTS[:50] if e["user_id"] not in MISSING_USERS
    }
    report = verify_app(app, pg_dsn)
    assert report.ok, report.summary()


def test_uuid_keys_and_a_table_dropped_while_running(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    ids = ["0b7e5a3c-8a5e-4a52-9a0e-0d6f3c1f0c11", "E2C8D3C4-0F0B-4B4B-8C2B-6A1B8A6B7D22"]
    path = tmp_path / "orders.jsonl"
    events: list[dict[str, Any]] = [
        {"id": i, "acct": [ids[0], ids[1], "not-a-uuid"][i % 3]} for i in range(30)
    ]
    write_events(path, events)
    pg_conn.execute(
        """
        CREATE TABLE accounts (acct uuid PRIMARY KEY, owner text);
        CREATE TABLE out (id bigint, owner text, _source text, _partition text,
            _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq));
        """
    )
    pg_conn.execute("INSERT INTO accounts VALUES (%s, 'ann'), (%s, 'bob')", ids)

    def drop_at_99(o: dict[str, Any]) -> bool:
        if o["id"] == 99:  # the table goes away while the job runs, before this batch's lookup
            with psycopg.connect(pg_dsn, autocommit=True) as other:
                other.execute("DROP TABLE IF EXISTS accounts")
        return True

    def app_for(path: Path) -> ps.App:
        app = ps.App("uuids", batch_size=10)
        app.stream("o", ps.FileSource(path)).filter(drop_at_99).lookup(
            "accounts", on="acct", columns=["owner"]
        ).map(lambda o: {"id": o["id"], "owner": o["owner"]}).to_table("out")
        return app

    run_app(app_for(path), pg_dsn, stop_when_idle=True)
    got = dict(pg_conn.execute("SELECT id, owner FROM out").fetchall())
    assert got == {e["id"]: ["ann", "bob", None][e["id"] % 3] for e in events}

    write_events(path, [*events, {"id": 99, "acct": ids[0]}])
    with pytest.raises(ConfigError, match="lookup table 'accounts' changed since the job"):
        run_app(app_for(path), pg_dsn, stop_when_idle=True)
    assert pg_conn.execute("SELECT count(*) FROM out").fetchone() == (30,)

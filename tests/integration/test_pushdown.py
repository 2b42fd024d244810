"""SQL pushdown against a real PostgreSQL: the pushed-down path and the Python path of the
same app leave identical sinks, the ledger has the same shape, and ``verify`` is clean."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import pgstream as ps
from pgstream.cli import main
from pgstream.runtime import pushdown
from pgstream.runtime.worker import run_app
from pgstream.sources.table import TableReader
from pgstream.verify import verify_app

SCHEMA = """
CREATE TABLE events (id bigserial PRIMARY KEY, "user" text, amount bigint, price numeric,
    note text, ts timestamptz);
CREATE TABLE facts (order_id bigint, "user" text, cents bigint, shout text,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL, _seq int NOT NULL);
CREATE UNIQUE INDEX ON facts (_offset, _seq, _source, _partition);
CREATE TABLE totals ("user" text PRIMARY KEY, n bigint, total numeric, lo bigint, hi bigint,
    mean numeric, _mean_sum numeric, _mean_count bigint);
CREATE TABLE per_minute ("user" text, window_start timestamptz, n bigint, total numeric,
    PRIMARY KEY ("user", window_start));
CREATE TABLE by_bucket (bucket bigint PRIMARY KEY, n bigint, spend numeric);
"""


def fill(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        """
        INSERT INTO events ("user", amount, price, note, ts)
        SELECT CASE WHEN i %% 11 = 0 THEN NULL ELSE 'u' || (i %% 7) END,
               CASE WHEN i %% 13 = 0 THEN NULL ELSE (i * 37) %% 23 - 5 END,
               (i %% 100) / 8.0,
               CASE i %% 4 WHEN 0 THEN 'Straße' WHEN 1 THEN 'ÉTÉ' WHEN 2 THEN NULL ELSE 'x' END,
               timestamptz '2024-01-01 00:00:00+00' + i * interval '7 seconds'
          FROM generate_series(1, %s) i
        """,
        [n],
    )


def shop(**settings: Any) -> ps.App:
    app = ps.App("shop", **settings)
    events = app.stream("events", ps.TableSource("public.events", offset_column="id"))
    positive = events.filter((ps.col("amount") > 0) | ps.col("user").is_null())
    positive.select(
        order_id=ps.col("id"),
        user=ps.coalesce(ps.col("user"), "nobody"),
        cents=ps.col("amount") * 100 / 7,
        shout=ps.col("note").upper(),
    ).to_table("facts")
    events.filter(ps.col("user").is_not_null()).key_by("user").aggregate(
        n=ps.count(),
        total=ps.sum("price"),
        lo=ps.min("amount"),
        hi=ps.max(ps.col("amount") * 2),
        mean=ps.avg("amount"),
    ).to_table("totals")
    events.filter(ps.col("user").is_not_null()).key_by("user").window(
        ps.tumbling(seconds=60), time="ts"
    ).aggregate(n=ps.count(), total=ps.sum(ps.col("price") * 2)).to_table("per_minute")
    events.key_by(ps.col("id") / 100, name="bucket").aggregate(
        n=ps.count("amount"), spend=ps.sum("price")
    ).to_table("by_bucket")
    return app


DUMPS = {
    "facts": "SELECT order_id, \"user\", cents, shout, _source, _partition, _offset, _seq "
    "FROM facts ORDER BY _offset",
    "totals": "SELECT \"user\", n, total, lo, hi, round(mean, 10), _mean_sum, _mean_count "
    "FROM totals ORDER BY 1",
    "per_minute": "SELECT * FROM per_minute ORDER BY 1, 2",
    "by_bucket": "SELECT * FROM by_bucket ORDER BY 1",
    "ledger": "SELECT partition, records_in, dead_letters FROM pgstream.batches ORDER BY 1",
}


def dump(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {name: conn.execute(q).fetchall() for name, q in DUMPS.items()}


def prepared(make_database: Callable[..., str], n: int) -> str:
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        fill(conn, n)
    return dsn


def test_every_path_of_the_shop_is_pushed_down() -> None:
    app = shop()
    paths = pushdown.explain_app(app)
    assert [p.runs for p in paths] == ["SQL"] * 4, paths


def test_pushdown_and_python_paths_leave_identical_sinks(
    make_database: Callable[..., str],
) -> None:
    sql_dsn, py_dsn = prepared(make_database, 3000), prepared(make_database, 3000)
    summary = run_app(shop(), sql_dsn, stop_when_idle=True)
    assert summary.records == 3000
    run_app(shop(pushdown=False, batch_size=700), py_dsn, stop_when_idle=True)
    pushed, python = dump(sql_dsn), dump(py_dsn)
    for name in ("facts", "totals", "per_minute", "by_bucket"):
        assert pushed[name] == python[name], name
        assert pushed[name], name
    assert sum(r[1] for r in pushed["ledger"]) == 3000
    for dsn in (sql_dsn, py_dsn):
        report = verify_app(shop(), dsn)
        assert report.ok, [v.describe() for v in report.violations[:5]]


def test_pushed_batches_read_no_rows(
    make_database: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = prepared(make_database, 20_000)

    def no_reading(*args: Any) -> Any:
        raise AssertionError("a pushed-down batch read rows into Python")

    monkeypatch.setattr(TableReader, "read", no_reading)
    summary = run_app(shop(), dsn, stop_when_idle=True)
    assert summary.records == 20_000
    with psycopg.connect(dsn) as conn:
        batches = conn.execute("SELECT count(*) FROM pgstream.batches").fetchone()
        assert batches == (1,)  # batches sized for SQL: the whole table in one
        facts = conn.execute("SELECT count(*) FROM facts").fetchone()
    assert facts is not None and facts[0] > 5000


def test_explain_names_the_step_that_keeps_a_path_in_python(tmp_path: Path) -> None:
    module = tmp_path / "explain_me.py"
    module.write_text(
        "import pgstream as ps\n"
        "app = ps.App('shop')\n"
        "ev = app.stream('events', ps.TableSource('public.events'))\n"
        "ev.filter(ps.col('amount') > 0).select(id=ps.col('id')).to_table('facts')\n"
        "ev.map(lambda r: r).key_by('user').aggregate(n=ps.count()).to_table('totals')\n"
        "ev.key_by('user').fold(0, lambda s, r: s + 1).to_table('counts')\n"
    )
    result = CliRunner().invoke(main, ["explain", f"{module}:app", "--sql"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("events -> facts") and " SQL " in lines[0]
    assert "rows are still read" in lines[0]
    assert 'INSERT INTO "facts"' in lines[1] and '("amount" > 0::bigint)' in lines[1]
    assert "Python" in lines[2] and "step 1 (map) is a Python function" in lines[2]
    assert "Python" in lines[3] and "fold keeps per-key state" in lines[3]


REJECTING = """
CREATE TABLE events (id bigserial PRIMARY KEY, "user" text, amount bigint);
CREATE TABLE capped (id bigint, ratio bigint CHECK (ratio <= 50),
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL, _seq int NOT NULL,
    UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE seen ("user" text PRIMARY KEY, n bigint);
"""


def rejecting_app(**settings: Any) -> ps.App:
    app = ps.App("caps", **settings)
    events = app.stream("events", ps.TableSource("public.events"))
    # amount 0 divides by zero (the statement fails in SQL; in Python the record raises);
    # amount 1 gives ratio 100, which the sink's CHECK rejects
    events.select(id=ps.col("id"), ratio=ps.lit(100) / ps.col("amount")).to_table("capped")
    return app


def test_a_rejected_row_falls_back_to_python_and_is_dead_lettered(
    make_database: Callable[..., str],
) -> None:
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REJECTING)
        conn.execute(
            "INSERT INTO events (\"user\", amount) SELECT 'u' || (i % 3), "
            "CASE WHEN i IN (77, 1500) THEN 1 WHEN i = 900 THEN 0 ELSE 2 + i % 5 END "
            "FROM generate_series(1, 2000) i"
        )
    summary = run_app(rejecting_app(), dsn, stop_when_idle=True)
    assert summary.records == 2000
    with psycopg.connect(dsn) as conn:
        dead = conn.execute(
            'SELECT "offset", operator, error FROM pgstream.dead_letters ORDER BY 1'
        ).fetchall()
        rows = conn.execute("SELECT count(*), sum(ratio) FROM capped").fetchone()
    assert [(d[0], d[1]) for d in dead] == [(77, "sink"), (900, "to_table(capped)"),
                                            (1500, "sink")]
    assert "ratio" in dead[0][2] and "division by zero" in dead[1][2]
    assert rows is not None and rows[0] == 1997
    assert rows[1] == sum(100 // (2 + i % 5) for i in range(1, 2001) if i not in (77, 900, 1500))
    report = verify_app(rejecting_app(), dsn)
    assert report.ok, [v.describe() for v in report.violations[:5]]


def test_one_source_feeds_sql_and_python_paths(make_database: Callable[..., str]) -> None:
    """A Python path's dead letter leaves no effect in the SQL path either (whole record)."""

    def mixed(**settings: Any) -> ps.App:
        app = ps.App("mixed", **settings)
        events = app.stream("events", ps.TableSource("public.events"))

        def checked(r: dict[str, Any]) -> dict[str, Any]:
            if r["amount"] == 3:
                raise ValueError("three is poison")
            return {"order_id": r["id"], "user": r["user"], "cents": r["amount"], "shout": None}

        events.map(checked).to_table("facts")
        events.filter(ps.col("user").is_not_null()).key_by("user").aggregate(
            n=ps.count(), total=ps.sum("amount"), lo=ps.min("amount"), hi=ps.max("amount"),
            mean=ps.avg("amount"),
        ).to_table("totals")
        return app

    paths = pushdown.explain_app(mixed())
    assert [p.runs for p in paths] == ["Python", "SQL"]
    sql_dsn, py_dsn = prepared(make_database, 2500), prepared(make_database, 2500)
    run_app(mixed(), sql_dsn, stop_when_idle=True)
    run_app(mixed(pushdown=False), py_dsn, stop_when_idle=True)
    pushed, python = dump(sql_dsn), dump(py_dsn)
    assert pushed["totals"] == python["totals"] and pushed["totals"]
    assert pushed["facts"] == python["facts"] and pushed["facts"]
    dead_q = 'SELECT "offset" FROM pgstream.dead_letters ORDER BY 1'
    with psycopg.connect(sql_dsn) as a, psycopg.connect(py_dsn) as b:
        assert a.execute(dead_q).fetchall() == b.execute(dead_q).fetchall() != []
    report = verify_app(mixed(), sql_dsn)
    assert report.ok, [v.describe() for v in report.violations[:5]]

"""An append sink's binary COPY stores exactly what its text COPY stores, and whatever the
binary format cannot write the same way is written (or rejected) by the text format.

Each group is written twice into tables of one shape: once as the sink writes it (binary where
:mod:`pgstream.sinks.copyformat` allows), once with the binary format switched off; the two
tables must hold the same rows, and a rejection must be the same error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.runtime.worker import Worker
from pgstream.sinks import append, copyformat
from pgstream.sinks.append import AppendSink

COLUMNS = """(big bigint, num integer, small smallint, t text, v varchar(8),
    f double precision, b boolean, n numeric, ts timestamptz,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL, UNIQUE (_offset, _seq, _source, _partition))"""
NAMES = ("big", "num", "small", "t", "v", "f", "b", "n", "ts")
N = 1_500  # over copyformat.MIN_ROWS


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn) as c:
        for table in ("as_sink", "as_text"):
            c.execute(f"CREATE TABLE {table} {COLUMNS}")
        c.commit()
        yield c


def sinks(conn: psycopg.Connection[Any]) -> tuple[AppendSink, AppendSink]:
    written, text = AppendSink("as_sink"), AppendSink("as_text")
    written.bind(conn)
    text.bind(conn)
    return written, text


def rows_of(outputs: list[dict[str, Any]]) -> dict[tuple[str, ...], list[Any]]:
    groups: dict[tuple[str, ...], list[Any]] = {}
    for i, o in enumerate(outputs):
        groups.setdefault(tuple(o), []).append(append.make_row(o.values(), "s", "0", i, 0))
    return groups


def write_both(
    conn: psycopg.Connection[Any],
    outputs: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[bool], Exception | None, Exception | None]:
    """Write ``outputs`` with the sink as it is, then in text alone: which binary COPYs
    succeeded, and each way's error (its transaction rolled back)."""
    written, text = sinks(conn)
    tried: list[bool] = []
    real = AppendSink._copy_binary

    def spy(self: AppendSink, *args: Any) -> bool:
        ok = real(self, *args)
        tried.append(ok)
        return ok

    errors: list[Exception | None] = []
    for sink, binary in ((written, True), (text, False)):
        with monkeypatch.context() as m:
            m.setattr(AppendSink, "_copy_binary", spy)
            if not binary:
                m.setattr(append, "BINARY_GROUPS", 0)
            try:
                with conn.cursor() as cur:
                    sink.write(cur, rows_of(outputs))
                conn.commit()
                errors.append(None)
            except (psycopg.Error, ValueError) as exc:
                conn.rollback()
                errors.append(exc)
    return tried, errors[0], errors[1]


def same_error(err: Exception | None, text_err: Exception | None) -> bool:
    """The same error class and message (the table's name aside)."""
    if err is None or text_err is None:
        return err is text_err
    return type(err) is type(text_err) and str(err).replace("as_sink", "as_text") == str(text_err)


def assert_same_tables(conn: psycopg.Connection[Any]) -> None:
    for a, b in (("as_sink", "as_text"), ("as_text", "as_sink")):
        diff = conn.execute(f"SELECT count(*) FROM (TABLE {a} EXCEPT ALL TABLE {b}) d")
        row = diff.fetchone()
        assert row is not None and row[0] == 0, f"{a} has rows {b} lacks"
    row = conn.execute("SELECT count(*) FROM as_sink").fetchone()
    assert row is not None and row[0] > 0


def edge_outputs() -> list[dict[str, Any]]:
    """Values at the edges of each column type the binary format writes."""
    texts = ["", "plain", "tab\there", "new\nline\r\n", "back\\slash", "\\N", "é ☃ 𝄞", " "]
    floats = [0.0, -0.0, 1e308, -1e-308, math.inf, -math.inf, math.nan, 0.1 + 0.2]
    bigs = [0, -1, 2**63 - 1, -(2**63), None]
    out = []
    for i in range(N):
        out.append(
            {
                "big": bigs[i % len(bigs)],
                "num": [2**31 - 1, -(2**31), i, None][i % 4],
                "small": [2**15 - 1, -(2**15), None][i % 3],
                "t": texts[i % len(texts)] if i % 11 else None,
                "v": texts[i % len(texts)][:8],
                "f": floats[i % len(floats)] if i % 13 else None,
                "b": [True, False, None][i % 3],
            }
        )
    return out


def test_edge_values_are_written_in_binary_and_stored_as_text_would(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    tried, err, text_err = write_both(conn, edge_outputs(), monkeypatch)
    assert (err, text_err) == (None, None)
    assert tried == [True]  # one group, written in binary
    assert_same_tables(conn)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("big", "123"),  # a string the bigint column parses
        ("big", True),  # a bool: the text format writes it as "t" (rejected)
        ("num", 2**31),  # out of integer's range: binary would wrap
        ("small", -(2**15) - 1),
        ("f", 3),  # an int into double precision
        ("n", 5),  # numeric has no binary form here
        ("ts", "2026-01-01T00:00:00Z"),
        ("t", 7),
    ],
)
def test_values_of_another_type_keep_the_text_format(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, column: str, value: Any
) -> None:
    outputs = [{"big": i, "num": i, "small": 1, "t": "x", "f": 0.5} for i in range(N)]
    for o in outputs:
        o.setdefault(column, None)  # one group: every output has the column
    outputs[N // 2][column] = value
    tried, err, text_err = write_both(conn, outputs, monkeypatch)
    assert tried == []
    assert same_error(err, text_err)
    if err is None:
        assert_same_tables(conn)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("big", 2**63),  # psycopg cannot dump it in binary
        ("t", "nul\x00inside"),  # the server refuses it in binary, psycopg in text
        ("v", "far too long"),  # varchar(8)
    ],
)
def test_a_value_binary_refuses_gets_the_text_formats_error(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, column: str, value: Any
) -> None:
    outputs = [{"big": i, "t": "x", "v": "ok"} for i in range(N)]
    outputs[N - 3][column] = value
    tried, err, text_err = write_both(conn, outputs, monkeypatch)
    assert tried == [False]  # tried in binary, undone, written in text
    assert err is not None and same_error(err, text_err)


def test_a_refused_binary_copy_is_undone_and_the_transaction_goes_on(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binary COPY refused halfway (here: told a wrong type, so psycopg refuses the first
    text value) is rolled back to its savepoint: the group is written once, in text, and
    the groups before and after it are kept."""
    real = copyformat.binary_types

    def wrong_for_b(declared: Any, rows: Any, checked: int) -> list[str] | None:
        types = real(declared, rows, checked)
        if types is not None and rows[0][0] == "b":  # the group (t, big)
            types[0] = "int8"  # the text column t as bigint
        return types

    monkeypatch.setattr(append, "binary_types", wrong_for_b)
    first = [{"big": i, "t": "a"} for i in range(N)]
    second = [{"t": "b", "big": i} for i in range(N, 2 * N)]  # its own group
    third = [{"big": i, "t": "c", "f": 1.5} for i in range(2 * N, 3 * N)]
    tried, err, text_err = write_both(conn, first + second + third, monkeypatch)
    assert (err, text_err) == (None, None)
    assert tried == [True, False, True]
    assert_same_tables(conn)
    row = conn.execute("SELECT count(*), count(DISTINCT _offset) FROM as_sink").fetchone()
    assert row == (3 * N, 3 * N)


def test_a_record_binary_refuses_is_dead_lettered_with_the_text_error(
    tmp_path: Path, pg_dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """End to end: among 3,000 good records, one whose output holds a NUL is found by
    bisection and dead-lettered with the text format's error; every other row is written."""
    path = tmp_path / "in.jsonl"
    with open(path, "w") as f:
        for i in range(3_000):
            f.write(json.dumps({"id": i, "t": "nul\x00" if i == 2_345 else f"r{i}"}) + "\n")
    app = ps.App("fmt", max_interval=0.05, poll_interval=0.02)
    app.stream("s", ps.FileSource(path)).map(lambda e: {"big": e["id"], "t": e["t"]}).to_table(
        "as_sink"
    )
    Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    row = conn.execute("SELECT count(*), count(DISTINCT big) FROM as_sink").fetchone()
    assert row == (2_999, 2_999)
    dead = conn.execute("SELECT error FROM pgstream.dead_letters").fetchall()
    assert len(dead) == 1 and "NUL (0x00)" in dead[0][0], dead
    assert copyformat.MIN_ROWS < 2_999

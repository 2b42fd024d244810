"""Several streams feeding one aggregate table (a union): allowed when the key columns, window
and aggregates match (the deltas merge in SQL); the table ends up with the sum over every
stream, exactly, and ``verify`` expects that sum. Folds and mismatched shapes are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstream as ps
from pgstream.errors import ConfigError

APP = """
import os
import pgstream as ps

app = ps.App("union", batch_size=70)
web = app.stream("web", ps.FileSource(os.environ["WEB"]))
shop = app.stream("shop", ps.FileSource(os.environ["SHOP"] + "/*.jsonl"))
web.key_by("who").aggregate(n=ps.count(), total=ps.sum("v")).to_table("totals")
shop.filter(lambda r: r["v"] != 5).key_by("who").aggregate(
    n=ps.count(), total=ps.sum("cents")
).to_table("totals")
"""


def _lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_two_streams_into_one_aggregate_table_are_exact_and_verified(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    pg_conn.execute("CREATE TABLE totals (who text PRIMARY KEY, n bigint, total bigint)")
    (tmp_path / "app.py").write_text(APP)
    web: list[dict[str, Any]] = [{"who": f"u{i % 9}", "v": i % 11} for i in range(700)]
    _lines(tmp_path / "web.jsonl", web)
    (tmp_path / "shop").mkdir()
    shop: list[dict[str, Any]] = []
    for f in range(3):
        part: list[dict[str, Any]] = [
            {"who": f"u{i % 5}", "v": i % 7, "cents": i} for i in range(f * 300, f * 300 + 250)
        ]
        _lines(tmp_path / "shop" / f"{f}.jsonl", part)
        shop += part
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(WEB=str(tmp_path / "web.jsonl"), SHOP=str(tmp_path / "shop"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pgstream", *args, "app:app", "--dsn", pg_dsn],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )

    done = cli("run", "--stop-when-idle")
    assert done.returncode == 0, done.stderr
    want: Counter[str] = Counter()
    n: Counter[str] = Counter()
    for r in web:
        n[r["who"]] += 1
        want[r["who"]] += r["v"]
    for r in shop:
        if r["v"] != 5:
            n[r["who"]] += 1
            want[r["who"]] += r["cents"]
    got = {u: (c, t) for u, c, t in pg_conn.execute("SELECT who, n, total FROM totals")}
    assert got == {u: (n[u], want[u]) for u in n}
    checked = cli("verify")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # verify expects the sum over both streams: a change to one key is caught
    pg_conn.execute("UPDATE totals SET total = total + 1 WHERE who = 'u1'")
    bad = cli("verify")
    assert bad.returncode == 1 and "u1" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def _two(a_key: str = "who", b_key: str = "who") -> tuple[ps.App, ps.Stream, ps.Stream]:
    app = ps.App("u")
    a = app.stream("a", ps.FileSource("a.jsonl"))
    b = app.stream("b", ps.FileSource("b.jsonl"))
    a.key_by(a_key).aggregate(n=ps.count(), total=ps.sum("v")).to_table("t")
    return app, a, b


def test_mismatched_unions_and_folds_are_refused() -> None:
    _app, _a, b = _two()
    b.key_by("who").aggregate(n=ps.count(), total=ps.sum("w")).to_table("t")  # same shape
    _app, _a, b = _two()
    with pytest.raises(ConfigError, match=r"different shapes \(key who, n=count, total=sum vs "
                       r"key account, n=count, total=sum\)"):
        b.key_by("account").aggregate(n=ps.count(), total=ps.sum("v")).to_table("t")
    _app, _a, b = _two()
    with pytest.raises(ConfigError, match="different shapes"):
        b.key_by("who").aggregate(n=ps.count(), total=ps.max("v")).to_table("t")
    _app, _a, b = _two()
    with pytest.raises(ConfigError, match="different shapes"):
        b.key_by("who").window(ps.tumbling(seconds=60), time="ts").aggregate(
            n=ps.count(), total=ps.sum("v")
        ).to_table("t")
    _app, _a, b = _two()
    with pytest.raises(
        ConfigError, match=r"target of a fold sink \(stream 'b'\) and an aggregate sink"
    ):
        b.key_by("who").fold(0, lambda s, r: s + 1).to_table("t")
    _app, _a, b = _two()
    with pytest.raises(ConfigError, match="append sink"):
        b.to_table("t")

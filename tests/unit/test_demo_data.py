"""The demo's input generator and its reference results."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgstream.demo import INPUT_ENV
from pgstream.demo.app import input_path, last_order, order_fact
from pgstream.demo.data import expected, generate


def test_input_is_deterministic_with_two_bad_lines(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    generate(a, 3000)
    generate(b, 3000)
    assert a.read_bytes() == b.read_bytes()
    ref = expected(a)
    assert ref.lines == 3000 and ref.size == a.stat().st_size
    data = a.read_bytes()
    bad = [data[o : data.index(b"\n", o)] for o in ref.dead_offsets]
    assert len(bad) == 2
    assert not bad[0].endswith(b"}")  # truncated line
    assert b'"amount_cents":"' in bad[1]  # a string amount
    assert len(ref.facts) == sum(t.n for t in ref.totals.values())
    assert sum(u.orders for u in ref.last.values()) == 3000 - 2


def test_input_path_from_env_or_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(INPUT_ENV, str(tmp_path / "x.jsonl"))
    assert input_path() == tmp_path / "x.jsonl"
    monkeypatch.delenv(INPUT_ENV)
    monkeypatch.setenv("PGSTREAM_HOME", str(tmp_path / "home"))
    assert input_path() == tmp_path / "home" / "demo" / "orders.jsonl"


def test_operators() -> None:
    order = {
        "order_id": 7,
        "user_id": "u1",
        "amount_cents": 1250,
        "status": "paid",
        "country": "DE",
        "ts": "2024-06-01T00:00:21Z",
    }
    assert order_fact(order)["cents"] == 1250
    state = {"orders": 2, "last_order_id": 3, "last_order_at": None, "last_status": "paid"}
    state["paid_streak"] = 2
    assert last_order(state, order)["paid_streak"] == 3
    assert last_order(state, {**order, "status": "refunded"})["paid_streak"] == 0

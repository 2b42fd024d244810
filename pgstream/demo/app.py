"""The demo job: orders from a JSON Lines file into three SQL tables, exactly once.

Run it with ``pgstream demo`` (which generates the input and creates the tables), or on its
own with ``pgstream run pgstream.demo.app:app`` once they exist. The input file is
``$PGSTREAM_DEMO_INPUT``, else ``<pgstream home>/demo/orders.jsonl``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pgstream as ps
from pgstream.demo import INPUT_ENV, JOB


def input_path() -> Path:
    """Where the demo's orders are: ``$PGSTREAM_DEMO_INPUT`` or ``<home>/demo/orders.jsonl``."""
    env = os.environ.get(INPUT_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    from pgstream.db.embedded import home_dir

    return home_dir() / "demo" / "orders.jsonl"


def order_fact(order: dict[str, Any]) -> dict[str, Any]:
    """The row ``demo_order_facts`` keeps for a paid order."""
    return {
        "order_id": order["order_id"],
        "user_id": order["user_id"],
        "country": order["country"],
        "cents": order["amount_cents"],
        "ordered_at": order["ts"],
    }


def last_order(state: dict[str, Any], order: dict[str, Any]) -> dict[str, Any]:
    """Fold step: count orders, remember the latest, track the run of paid orders."""
    paid = order["status"] == "paid"
    return {
        "orders": state["orders"] + 1,
        "last_order_id": order["order_id"],
        "last_order_at": order["ts"],
        "last_status": order["status"],
        "paid_streak": state["paid_streak"] + 1 if paid else 0,
    }


EMPTY = {
    "orders": 0,
    "last_order_id": None,
    "last_order_at": None,
    "last_status": None,
    "paid_streak": 0,
}

app = ps.App(JOB, batch_size=5000)
orders = app.stream("orders", ps.FileSource(input_path()))

paid = orders.filter(lambda o: o["status"] == "paid")
paid.map(order_fact).to_table("demo_order_facts")
paid.key_by("user_id").aggregate(
    n=ps.count(), total_cents=ps.sum("amount_cents"), avg_cents=ps.avg("amount_cents")
).to_table("demo_user_totals")
orders.key_by("user_id").fold(EMPTY, last_order).to_table("demo_user_last")

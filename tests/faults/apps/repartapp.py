"""The app ``tests/faults/test_repartition_group.py`` runs as ``pgstream run repartapp:app``.

``events`` (the harness's event table) is split into 4 partitions by ``id``, so every user's
events arrive through all of them; a fold keyed by ``user_id`` therefore goes through a
repartition in 3 partitions. The fold's state is commutative (the order in which records of
one key from different source partitions arrive is not fixed), and ``amount == 13`` raises in
the fold: a dead letter of the second stage. ``REPARTAPP_LEASE`` / ``REPARTAPP_BATCH``.
"""

from __future__ import annotations

import os
from typing import Any

import pgstream as ps

POISON_AMOUNT = 13
MOD = 1_000_003
SOURCE_PARTITIONS = 4
REPARTITIONS = 3

app = ps.App(
    "repart-group",
    lease_seconds=float(os.environ.get("REPARTAPP_LEASE", "3")),
    batch_size=int(os.environ.get("REPARTAPP_BATCH", "50")),
    max_interval=0.1,
    poll_interval=0.05,
)


def user_step(state: dict[str, int], r: dict[str, Any]) -> dict[str, int]:
    """Count, total and a sum of squared ids per user; the poison amount raises."""
    if r["amount"] == POISON_AMOUNT:
        raise ValueError(f"poison amount in event {r['id']}")
    return {
        "n": state["n"] + 1,
        "total": state["total"] + r["amount"],
        "sq": (state["sq"] + r["id"] * r["id"]) % MOD,
    }


events = app.stream(
    "events",
    ps.TableSource(
        "public.events", offset_column="id", partitions=SOURCE_PARTITIONS, partition_by="id"
    ),
)
events.filter(lambda r: r["amount"] != 0).key_by("user_id").fold(
    {"n": 0, "total": 0, "sq": 0}, user_step, partitions=REPARTITIONS
).to_table("user_state")

DDL = """
CREATE TABLE events (id bigserial PRIMARY KEY, user_id integer NOT NULL,
                     amount integer NOT NULL);
CREATE TABLE user_state (user_id integer PRIMARY KEY, n bigint, total bigint, sq bigint);
"""


def reference(rows: list[tuple[int, int, int]]) -> dict[int, tuple[int, int, int]]:
    """The sink computed from ``(id, user_id, amount)`` rows alone."""
    want: dict[int, tuple[int, int, int]] = {}
    for i, user, amount in rows:
        if amount in (0, POISON_AMOUNT):
            continue
        n, total, sq = want.get(user, (0, 0, 0))
        want[user] = (n + 1, total + amount, (sq + i * i) % MOD)
    return want

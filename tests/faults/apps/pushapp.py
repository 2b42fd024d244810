"""The pushed-down twin of ``faultapp``: every table path is declarative, so each batch is one
``INSERT ... SELECT`` per sink and no row is read into Python (issue 8).

Same environment and sink tables as :mod:`faultapp` (``FAULTAPP_TABLES``, ``FAULTAPP_BATCH``,
``FAULTAPP_LEASE``, ``FAULTAPP_PARTITIONS``; no file stream, no fold). Per table: events with
``amount != 0`` append ``(event_id, user_id, cents = amount * 100)`` to ``event_facts`` (one
row each, ``_seq`` 0) and merge ``n, total, lo, hi, mean`` per ``user_id`` into
``<table>_totals``. ``PUSHAPP_PYTHON=1`` runs the same app with pushdown off.
"""

from __future__ import annotations

import os
from typing import Any

import pgstream as ps

TABLES = [t.strip() for t in os.environ.get("FAULTAPP_TABLES", "events").split(",") if t.strip()]
LEASE = float(os.environ.get("FAULTAPP_LEASE", "10"))
BATCH = int(os.environ.get("FAULTAPP_BATCH", "200"))
PARTITIONS = int(os.environ.get("FAULTAPP_PARTITIONS", "1"))

app = ps.App(
    "faults", lease_seconds=LEASE, batch_size=BATCH, max_interval=0.2, poll_interval=0.05,
    pushdown=os.environ.get("PUSHAPP_PYTHON") != "1",
)

for _table in TABLES:
    _split: dict[str, Any] = (
        {"partitions": PARTITIONS, "partition_by": "user_id"} if PARTITIONS > 1 else {}
    )
    _events = app.stream(_table, ps.TableSource(f"public.{_table}", offset_column="id", **_split))
    _valid = _events.filter(ps.col("amount") != 0)
    _valid.select(
        event_id=ps.col("id"), user_id=ps.col("user_id"), cents=ps.col("amount") * 100
    ).to_table("event_facts")
    _valid.key_by("user_id").aggregate(
        n=ps.count(), total=ps.sum("amount"), lo=ps.min("amount"), hi=ps.max("amount"),
        mean=ps.avg("amount"),
    ).to_table(f"{_table}_totals")

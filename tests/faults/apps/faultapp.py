"""The app the fault tests run as ``pgstream run faultapp:app``, configured by environment.

* ``FAULTAPP_TABLES`` (default ``events``): comma-separated source tables; each is a stream
  named like its table, all append into the shared sink ``event_facts`` and each has its own
  aggregate (``<table>_totals``) and fold (``<table>_fold``) sinks.
* ``FAULTAPP_FILE``: a JSON Lines file read as the stream ``clicks`` (``click_facts``,
  ``page_counts``); unset: no file stream.
* ``FAULTAPP_PARTITIONS`` (default 1): N > 1 splits each source table into N partitions by
  ``user_id`` (``TableSource(partitions=N, partition_by="user_id")``).
* ``FAULTAPP_LEASE`` (seconds, default 10), ``FAULTAPP_BATCH`` (default 200).
* ``FAULTAPP_FREEZE_ID`` + ``FAULTAPP_FREEZE_MARK``: the first process to evaluate the
  event with that id creates the marker file and freezes itself with SIGSTOP, mid-batch.

The operators are deliberately varied: a filter, a flat_map with one or two outputs per
record (``_seq`` 0 and 1), a poison value that raises (``amount == 13``: dead letter),
built-in aggregates including ``avg``, and an order-sensitive fold (a rolling hash of ids).
:mod:`tests.faults.harness` computes the same results independently as the reference.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pgstream as ps

POISON_AMOUNT = 13
HASH_MOD = 1_000_000_007

TABLES = [t.strip() for t in os.environ.get("FAULTAPP_TABLES", "events").split(",") if t.strip()]
FILE = os.environ.get("FAULTAPP_FILE") or None
LEASE = float(os.environ.get("FAULTAPP_LEASE", "10"))
BATCH = int(os.environ.get("FAULTAPP_BATCH", "200"))
PARTITIONS = int(os.environ.get("FAULTAPP_PARTITIONS", "1"))
_FREEZE_ID = int(os.environ.get("FAULTAPP_FREEZE_ID", "0") or 0)
_FREEZE_MARK = os.environ.get("FAULTAPP_FREEZE_MARK", "")


def _maybe_freeze(event_id: int) -> None:
    if _FREEZE_ID and event_id == _FREEZE_ID and _FREEZE_MARK and not os.path.exists(_FREEZE_MARK):
        with open(_FREEZE_MARK, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)


def event_facts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One fact per event, two for amounts ending in 7; the poison amount raises."""
    _maybe_freeze(r["id"])
    if r["amount"] == POISON_AMOUNT:
        raise ValueError(f"poison amount {POISON_AMOUNT} in event {r['id']}")
    out = [{"event_id": r["id"], "user_id": r["user_id"], "cents": r["amount"] * 100}]
    if r["amount"] % 10 == 7:
        out.append({"event_id": r["id"], "user_id": r["user_id"], "cents": -1})
    return out


def fold_step(state: dict[str, int], r: dict[str, Any]) -> dict[str, int]:
    """Order-sensitive per-user state: count, rolling hash of ids, last id."""
    return {
        "n": state["n"] + 1,
        "h": (state["h"] * 31 + r["id"]) % HASH_MOD,
        "last": r["id"],
    }


def nonzero(r: dict[str, Any]) -> bool:
    return bool(r["amount"] != 0)


app = ps.App("faults", lease_seconds=LEASE, batch_size=BATCH, max_interval=0.2, poll_interval=0.05)

for _table in TABLES:
    _split: dict[str, Any] = (
        {"partitions": PARTITIONS, "partition_by": "user_id"} if PARTITIONS > 1 else {}
    )
    _events = app.stream(_table, ps.TableSource(f"public.{_table}", offset_column="id", **_split))
    _valid = _events.filter(nonzero)
    _valid.flat_map(event_facts).to_table("event_facts")
    _valid.key_by("user_id").aggregate(
        n=ps.count(), total=ps.sum("amount"), lo=ps.min("amount"), hi=ps.max("amount"),
        mean=ps.avg("amount"),
    ).to_table(f"{_table}_totals")
    _valid.key_by("user_id").fold({"n": 0, "h": 0, "last": 0}, fold_step).to_table(
        f"{_table}_fold"
    )

if FILE:
    _clicks = app.stream("clicks", ps.FileSource(FILE))
    _clicks.map(lambda c: {"page": c["page"], "ms": c["ms"]}).to_table("click_facts")
    _clicks.key_by("page").aggregate(n=ps.count(), total_ms=ps.sum("ms")).to_table("page_counts")


def ddl(tables: list[str], with_file: bool) -> str:
    """The sink tables (and source tables) this app needs, as plain SQL."""
    parts = [
        """
        CREATE TABLE event_facts (
            event_id bigint NOT NULL, user_id integer NOT NULL, cents bigint NOT NULL,
            _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
            _seq integer NOT NULL DEFAULT 0);
        CREATE UNIQUE INDEX event_facts_pos ON event_facts (_source, _partition, _offset, _seq);
        """
    ]
    for t in tables:
        parts.append(
            f"""
            CREATE TABLE {t} (id bigserial PRIMARY KEY, user_id integer NOT NULL,
                              amount integer NOT NULL);
            CREATE TABLE {t}_totals (user_id integer PRIMARY KEY, n bigint NOT NULL,
                                     total bigint, lo integer, hi integer, mean numeric,
                                     _mean_sum numeric, _mean_count bigint NOT NULL DEFAULT 0);
            CREATE TABLE {t}_fold (user_id integer PRIMARY KEY, n bigint, h bigint, last bigint);
            """
        )
    if with_file:
        parts.append(
            """
            CREATE TABLE click_facts (page text NOT NULL, ms integer NOT NULL,
                _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
                _seq integer NOT NULL DEFAULT 0,
                UNIQUE (_source, _partition, _offset, _seq));
            CREATE TABLE page_counts (page text PRIMARY KEY, n bigint NOT NULL, total_ms bigint);
            """
        )
    return "\n".join(parts)

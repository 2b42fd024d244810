"""The demo's input, generated deterministically, and the results it must produce.

:func:`generate` writes ``events`` JSON lines of orders, two of them bad on purpose (a
truncated line and an amount that is not a number). :func:`expected` re-reads the file with
the standard library's :mod:`json` and computes, in plain Python, what the job's tables must
hold — the reference for the demo's exactly-once check.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

SEED = 20240601
START = datetime(2024, 6, 1, tzinfo=timezone.utc)
STATUSES = ("paid", "refunded", "cancelled")
STATUS_WEIGHTS = (86, 9, 5)
COUNTRIES = ("DE", "FR", "NL", "ES", "IT", "PL", "SE", "AT")


@dataclass(frozen=True, slots=True)
class UserTotal:
    """Expected ``demo_user_totals`` row."""

    n: int
    total_cents: int


@dataclass(frozen=True, slots=True)
class UserLast:
    """Expected ``demo_user_last`` row."""

    orders: int
    last_order_id: int
    last_order_at: datetime
    last_status: str
    paid_streak: int


@dataclass(slots=True)
class Expected:
    """What the job must produce from one input file."""

    lines: int = 0
    size: int = 0
    facts: list[tuple[int, str, int]] = field(default_factory=list)
    totals: dict[str, UserTotal] = field(default_factory=dict)
    last: dict[str, UserLast] = field(default_factory=dict)
    dead_offsets: list[int] = field(default_factory=list)


def _user_weights(users: int) -> list[float]:
    """Cumulative weights of a skewed (Zipf-like) user popularity."""
    cum: list[float] = []
    total = 0.0
    for rank in range(1, users + 1):
        total += 1.0 / rank**0.7
        cum.append(total)
    return cum


def generate(path: Path, events: int, seed: int = SEED) -> None:
    """Write ``events`` order lines to ``path`` (atomically), two of them malformed."""
    rng = random.Random(seed)
    users = max(20, events // 40)
    user_ids = [f"u{i:05d}" for i in range(1, users + 1)]
    who = rng.choices(user_ids, cum_weights=_user_weights(users), k=events)
    status = rng.choices(STATUSES, weights=STATUS_WEIGHTS, k=events)
    country = rng.choices(COUNTRIES, k=events)
    truncated = {events // 3} if events >= 3 else set()
    bad_amount = {(2 * events) // 3} if events >= 3 else set()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    days: dict[int, str] = {}
    with tmp.open("wb") as f:
        for i in range(events):
            day, secs = divmod(i * 3, 86400)
            date = days.get(day) or days.setdefault(
                day, (START + timedelta(days=day)).strftime("%Y-%m-%d")
            )
            hh, rest = divmod(secs, 3600)
            order: dict[str, Any] = {
                "order_id": i + 1,
                "user_id": who[i],
                "amount_cents": max(50, int(rng.lognormvariate(8.0, 0.75))),
                "status": status[i],
                "country": country[i],
                "ts": f"{date}T{hh:02d}:{rest // 60:02d}:{rest % 60:02d}Z",
            }
            if i in bad_amount:  # an upstream bug: a localized string amount
                order["status"] = "paid"
                cents = order["amount_cents"]
                order["amount_cents"] = f"{cents // 100},{cents % 100:02d}"
            line = orjson.dumps(order)
            if i in truncated:  # a producer crashed mid-write
                line = line[: len(line) // 2]
            f.write(line + b"\n")
    os.replace(tmp, path)


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def expected(path: Path) -> Expected:
    """The reference results for the input at ``path``, computed in plain Python."""
    ref = Expected()
    totals: dict[str, list[int]] = {}
    last: dict[str, tuple[int, int, str, str, int]] = {}
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            pos, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            ref.lines += 1
            try:
                order = json.loads(raw)
            except ValueError:
                ref.dead_offsets.append(pos)  # not JSON: the source's decoder rejects it
                continue
            paid = order["status"] == "paid"
            if paid and type(order["amount_cents"]) is not int:
                ref.dead_offsets.append(pos)  # sum() of a string raises: dead letter
                continue
            user = order["user_id"]
            if paid:
                ref.facts.append((order["order_id"], user, order["amount_cents"]))
                t = totals.setdefault(user, [0, 0])
                t[0] += 1
                t[1] += order["amount_cents"]
            n, _, _, _, streak = last.get(user, (0, 0, "", "", 0))
            last[user] = (
                n + 1,
                order["order_id"],
                order["ts"],
                order["status"],
                streak + 1 if paid else 0,
            )
    ref.size = offset
    ref.facts.sort()
    ref.totals = {u: UserTotal(n, total) for u, (n, total) in totals.items()}
    ref.last = {
        u: UserLast(n, order_id, _parse_ts(ts), status, streak)
        for u, (n, order_id, ts, status, streak) in last.items()
    }
    return ref


__all__ = ["Expected", "UserLast", "UserTotal", "expected", "generate"]

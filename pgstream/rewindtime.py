"""``pgstream rewind --to-time TIME``: which batch boundary a point in time means.

TIME is an ISO-8601 timestamp with a timezone (``2026-12-07T21:30:00+00:00``, ``...Z``) or a
time ago (``-15m``, ``2h``, ``90 minutes``: a PostgreSQL interval, read against the database
clock, the clock that stamps the ledger).

Two readings, and the command says which one it used:

* **the source's record times**, where the source can map a time to an offset
  (:meth:`~pgstream.sources.base.Source.offset_at`: Kafka message timestamps, NATS JetStream
  storage times, Redis entry ids): TIME maps to offset X, the first record at or after TIME;
* **the ledger's commit times** otherwise (files, tables: their records carry no time): the
  start of the partition's first batch committed at or after TIME ("undo what was committed
  since TIME").

Rewind retracts whole batches, so X is rounded DOWN to the start Y of the committed batch that
holds it: records from Y on are processed again. An X at or after the committed offset leaves
nothing to rewind; an X before the partition's first batch means its first batch's start (the
rewind's own checks then decide whether the partition can go back that far).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import psycopg.errors

from pgstream.api import App
from pgstream.db import queries
from pgstream.errors import ConfigError, JobStateError
from pgstream.sources.base import OpenContext, SourceError

__all__ = ["TimeTarget", "parse_time", "resolve_time"]

TIME_HINT = (
    "give --to-time an ISO-8601 time with a timezone (2026-12-07T21:30:00+00:00, "
    "2026-12-07T21:30:00Z) or a time ago (-15m, 2h, '90 minutes')"
)


@dataclass(slots=True)
class TimeTarget:
    """The batch boundary TIME means (``to``; None: nothing to rewind) and how it was found
    (``lines``, for the user)."""

    to: int | None
    lines: list[str] = field(default_factory=list)


def parse_time(conn: psycopg.Connection[Any], text: str) -> datetime:
    """``text`` as a timezone-aware time: ISO-8601 with a timezone, or a time ago (a
    PostgreSQL interval, against the database clock)."""
    iso = text.strip()
    if iso.endswith(("Z", "z")):
        iso = iso[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return _ago(conn, text)
    if when.tzinfo is None:
        raise ConfigError(
            f"--to-time {text!r} has no timezone: it could mean any of 24 hours",
            hint="add one (2026-12-07T21:30:00+00:00, or a trailing Z for UTC)",
        )
    return when


def _ago(conn: psycopg.Connection[Any], text: str) -> datetime:
    try:
        with conn.transaction():
            row = conn.execute(queries.REWIND_TIME_AGO, {"ago": text.strip()}).fetchone()
    except psycopg.errors.DataError:
        raise ConfigError(
            f"--to-time {text!r} is neither an ISO-8601 time nor a time ago", hint=TIME_HINT
        ) from None
    assert row is not None
    when: datetime = row[0]
    return when


def resolve_time(
    conn: psycopg.Connection[Any],
    app: App,
    stream: str,
    partition: str,
    when: datetime,
    dsn: str,
) -> TimeTarget:
    """The batch boundary of ``stream``/``partition`` that ``when`` means (module
    docstring)."""
    source = app.sources[stream]
    try:
        at = source.offset_at(partition, when, OpenContext(dsn))
    except SourceError as exc:
        raise JobStateError(
            f"{source.describe()} cannot map {when.isoformat()} to an offset: {exc}",
            hint="rewind with --to OFFSET instead (a batch boundary: `pgstream status` and "
            "pgstream.batches show them)",
        ) from None
    params = {"job": app.name, "source": stream, "partition": partition}
    if at is None:
        return _by_ledger(conn, params, source.describe(), when)
    return _by_source(conn, params, source.describe(), when, at)


def _by_source(
    conn: psycopg.Connection[Any], params: dict[str, Any], source: str, when: datetime, at: int
) -> TimeTarget:
    row = conn.execute(queries.REWIND_BOUNDARY_AT, {**params, "at": at}).fetchone()
    where = f"{params['source']}/{params['partition']}"
    found = f"{when.isoformat()} maps to offset {at} ({source})"
    if row is None or row[0] is None:
        return TimeTarget(None, [f"{found}; {where} has no checkpoint: nothing to rewind"])
    committed, holding, first = int(row[0]), row[1], row[2]
    if at >= committed:
        return TimeTarget(
            None,
            [f"{found}, at or after the committed offset {committed}: nothing to rewind"],
        )
    to = at if first is None else int(holding if holding is not None else first)
    lines = [
        f"{found}; rewinding to the batch boundary {to} (records from {to} on are processed again)"
    ]
    if holding is None and first is not None:
        lines.append(f"  offset {at} is before {where}'s first committed batch, at {to}")
    return TimeTarget(to, lines)


def _by_ledger(
    conn: psycopg.Connection[Any], params: dict[str, Any], source: str, when: datetime
) -> TimeTarget:
    where = f"{params['source']}/{params['partition']}"
    reading = (
        f"{source} has no record times: {when.isoformat()} is read against the ledger "
        "(what was committed since then is undone)"
    )
    row = conn.execute(queries.REWIND_FIRST_BATCH_SINCE, {**params, "when": when}).fetchone()
    if row is None:
        last = conn.execute(queries.REWIND_LAST_COMMIT, params).fetchone()
        since = f" (its last commit was at {last[0].isoformat()})" if last and last[0] else ""
        return TimeTarget(
            None,
            [reading, f"nothing was committed to {where} since then{since}: nothing to rewind"],
        )
    to, at = int(row[0]), row[1]
    return TimeTarget(
        to,
        [
            reading,
            f"the first batch committed since then starts at offset {to} (committed at "
            f"{at.isoformat()}); rewinding to the batch boundary {to} (records from {to} on "
            "are processed again)",
        ],
    )

"""What the job committed, read back: its partitions, dead letters and ledger, and the ledger's
tiling check (``ledger-gap`` / ``ledger-overlap``, ``lost`` records)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import psycopg

from pgstream.api import App
from pgstream.db import queries
from pgstream.sources.base import Source, SourceRecord
from pgstream.sources.table import MIN_OFFSET
from pgstream.verify.report import CannotVerify, VerifyReport, Violation


@dataclass(slots=True)
class Partition:
    """One partition of the job as its checkpoint row has it."""

    source: str
    partition: str
    committed: int | None
    epoch: int


def load_partitions(conn: psycopg.Connection[Any], app: App) -> list[Partition]:
    """Every partition the job registered."""
    rows = conn.execute(queries.VERIFY_PARTITIONS, {"job": app.name}).fetchall()
    return [Partition(r[0], r[1], r[2], r[3]) for r in rows]


def count_redriven(conn: psycopg.Connection[Any], job: str) -> int:
    """The job's redriven dead letters (their records' effects are checked in the sinks)."""
    row = conn.execute(queries.VERIFY_REDRIVEN, {"job": job}).fetchone()
    return int(row[0]) if row else 0


def load_dead_letters(
    conn: psycopg.Connection[Any], job: str
) -> dict[tuple[str, str], dict[int, str]]:
    """(source, partition) -> offset -> the operator each OPEN stored dead letter names.

    A redriven dead letter is left out: ``pgstream dlq redrive`` wrote its record's effect,
    so the replay expects that effect in the sinks, once, like any other record's."""
    out: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for source, partition, offset, operator in conn.execute(
        queries.VERIFY_DEAD_LETTERS, {"job": job}
    ):
        out[(source, partition)][offset] = operator or ""
    return out


def load_skips(conn: psycopg.Connection[Any], job: str) -> list[str]:
    """One report line per range a source's reset policy skipped (not a violation: the
    source no longer held it and the job was told to go on)."""
    return [
        f"skipped by policy: {source}/{partition} offsets [{start}, {end}) ({reason}: "
        f"{detail}; on_lost={policy!r}, at {at:%Y-%m-%d %H:%M:%S%z})"
        for source, partition, start, end, reason, detail, policy, at in conn.execute(
            queries.VERIFY_SKIPS, {"job": job}
        )
    ]


#: a partition's batches: (start, end, records_in, plan_version), in offset order
Ledger = list[tuple[int, int, int, int | None]]


def load_ledger(conn: psycopg.Connection[Any], job: str, p: Partition) -> Ledger:
    """The ledger of partition ``p``."""
    params = {"job": job, "source": p.source, "partition": p.partition}
    rows = conn.execute(queries.VERIFY_LEDGER, params).fetchall()
    return [(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows]


@dataclass(slots=True)
class Segment:
    """A range to replay: a ledger batch (or the part of it inside the committed range), or a
    gap no batch covers."""

    start: int
    end: int
    records_in: int | None  # None: not a ledger batch (a gap)
    version: int | None = 0  # the plan version it ran under (None: unknown; 0: no batch)


def segments(
    ledger: Ledger, initial: int, p: Partition, report: VerifyReport
) -> list[Segment]:
    """Check the ledger's tiling; return the ranges to re-evaluate (gaps included)."""
    where = {"sink": "pgstream.batches", "source": p.source, "partition": p.partition}
    committed = p.committed
    if committed is None:
        for start, _end, _n, _v in ledger:
            report.violations.append(
                Violation("ledger-overlap", offset=start, detail="a batch exists but the "
                          "partition has no committed offset", **where)
            )
        return []
    segs: list[Segment] = []
    pos = initial
    for start, end, n, version in ledger:
        if start > pos:
            report.violations.append(
                Violation("ledger-gap", offset=real_offset(pos),
                          detail=f"no batch covers {offsets_label(pos, start)}", **where)
            )
            segs.append(Segment(pos, min(start, committed), None))
        elif start < pos:
            report.violations.append(
                Violation("ledger-overlap", offset=start,
                          detail=f"{batch_label(start, end)} overlaps what ends at {pos}", **where)
            )
        if end > committed:
            report.violations.append(
                Violation("ledger-overlap", offset=max(start, committed),
                          detail=f"{batch_label(start, end)} reaches past the committed offset "
                          f"{committed}", **where)
            )
        lo, hi = max(start, pos), min(end, committed)
        if hi > lo:
            exact = start >= pos and end <= committed
            segs.append(Segment(lo, hi, n if exact else None, version))
        pos = max(pos, end)
    if pos < committed:
        report.violations.append(
            Violation("ledger-gap", offset=real_offset(pos),
                      detail=f"{_ledger_end(pos)} but the committed offset is {committed}",
                      **where)
        )
        segs.append(Segment(pos, committed, None))
    return [s for s in segs if s.end > s.start]


def check_count(
    seg: Segment,
    records: list[SourceRecord],
    source: Source,
    p: Partition,
    report: VerifyReport,
) -> None:
    """``lost`` when the source holds more records in ``seg`` than its batch processed;
    :class:`CannotVerify` when it holds fewer (the range was deleted or truncated)."""
    n = len(records)
    if seg.records_in is None or n == seg.records_in:
        return
    first = records[0].offset if records else None
    batch = batch_label(seg.start, seg.end, first)
    if n < seg.records_in:
        raise CannotVerify(
            f"{source.describe()} no longer holds the committed range: {batch} of "
            f"{p.source}/{p.partition} processed {seg.records_in} records, the source now holds "
            f"{n} there (deleted or truncated?)"
        )
    report.violations.append(
        Violation(
            "lost", "pgstream.batches", p.source, p.partition, real_offset(seg.start, first),
            detail=f"{batch} processed {seg.records_in} records but the source holds {n} there: "
            f"{n - seg.records_in} record(s) were skipped",
        )
    )


# -- offset ranges in messages ------------------------------------------------------------------
# A table source starts at -2**63 ("before every row"): a ledger range starting there is shown
# by the offset of its first record, never as the sentinel.


def real_offset(offset: int, first: int | None = None) -> int | None:
    """``offset`` for a report, or the first record's offset (or None) for the sentinel."""
    return first if offset <= MIN_OFFSET else offset


def batch_label(start: int, end: int, first: int | None = None) -> str:
    """``batch [start, end)``; from the sentinel, ``batch [first record, end)``."""
    if start > MIN_OFFSET:
        return f"batch [{start}, {end})"
    if first is not None:
        return f"batch [{first}, {end})"
    return f"the first batch (offsets below {end})"


def offsets_label(start: int, end: int) -> str:
    """``[start, end)``, or ``the offsets below end`` from the sentinel."""
    return f"[{start}, {end})" if start > MIN_OFFSET else f"the offsets below {end}"


def _ledger_end(pos: int) -> str:
    return f"the ledger ends at {pos}" if pos > MIN_OFFSET else "the ledger has no batch"

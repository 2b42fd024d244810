"""``pgstream status``: per job/source/partition progress, lag, owner and epoch."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from pgstream.cli import dsn_option


@click.command("status")
@click.argument("target", metavar="[MODULE:APP]", required=False)
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(target: str | None, dsn: str | None, as_json: bool) -> None:
    """Show committed offset, source head, lag, last commit, owner and epoch per partition.

    With MODULE:APP, only that job, and the source head is read live from its sources
    (otherwise it is the head seen at the last commit); a table partition behind its head also
    names the sessions whose open transactions hold its safe horizon back (``held_by``)."""
    from pgstream.db import queries
    from pgstream.db.connect import connect, resolve_dsn
    from pgstream.db.migrate import ensure_migrated

    resolved = resolve_dsn(dsn)
    app = None
    if target:
        from pgstream.loader import load_app

        app = load_app(target)
    with connect(resolved, autocommit=True) as conn:
        ensure_migrated(conn)
        rows = conn.execute(queries.STATUS, {"job": app.name if app else None}).fetchall()
        backlog = conn.execute(
            queries.REPARTITION_BACKLOG, {"job": app.name if app else None}
        ).fetchall()
    names = [
        "job",
        "source",
        "partition",
        "committed_offset",
        "source_head",
        "last_commit_at",
        "owner",
        "epoch",
        "batches",
        "records",
        "leased",
        "dead_letters",
    ]
    items = [{**dict(zip(names, r)), "held_by": None, "stage": None} for r in rows]
    if app is not None:
        _live_heads(app, resolved, items)
    for item in items:
        head, done = item["source_head"], item["committed_offset"]
        item["lag"] = None if head is None or done is None else max(0, head - done)
        if not item["leased"]:
            item["owner"] = None
    _repartition_stages(items, backlog)
    if as_json:
        click.echo(json.dumps(items, default=_json_default, indent=2))
        return
    _print_table(items)
    _print_repartitions(items)


def _repartition_stages(items: list[dict[str, Any]], backlog: list[tuple[Any, ...]]) -> None:
    """Mark both stages of every repartition (:mod:`pgstream.runtime.repartition`): a
    partition of an upstream stream gets ``stage = "hand-over"`` and ``feeds`` (the
    repartition streams it writes), a repartition partition ``stage = "fold"``, ``handed_over``
    (rows written to it) and ``lag`` = rows not yet folded."""
    feeds: dict[tuple[str, str], set[str]] = {}
    rows: dict[tuple[str, str, str], tuple[int, int]] = {}
    for job, stream, rpart, upstreams, total, waiting in backlog:
        rows[(job, stream, rpart)] = (int(total), int(waiting))
        for up in upstreams:
            feeds.setdefault((job, up), set()).add(stream)
    streams = {(job, stream) for job, stream, _ in rows}
    for item in items:
        key = (item["job"], item["source"])
        if key in streams or item["source"].endswith(":repartition"):
            total, waiting = rows.get((*key, item["partition"]), (0, 0))
            item.update(stage="fold", handed_over=total, lag=waiting)
        elif key in feeds:
            item.update(stage="hand-over", feeds=sorted(feeds[key]))


def _print_repartitions(items: list[dict[str, Any]]) -> None:
    """Below the table: each repartition's two stages in one line."""
    folds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for it in items:
        if it["stage"] == "fold":
            folds.setdefault((it["job"], it["source"]), []).append(it)
    for (job, stream), parts in sorted(folds.items()):
        ups = sorted({it["source"] for it in items if stream in (it.get("feeds") or ())})
        handed = sum(it["handed_over"] for it in parts)
        waiting = sum(it["lag"] or 0 for it in parts)
        click.echo(
            f"{job}: repartition {stream} (stage 1: {', '.join(ups) or '-'} hand records over; "
            f"stage 2: {len(parts)} partitions fold them): {handed} rows handed over, "
            f"{waiting} not folded yet"
        )


#: a transaction open at least this long that the safe horizon waits for is named as holding
#: a table source back (shorter ones are ordinary traffic, not a hold)
HOLD_MIN_AGE = 1.0


def _live_heads(app: Any, dsn: str, items: list[dict[str, Any]]) -> None:
    """Read each partition's head live; for a table partition whose committed offset is below
    its head, also the sessions holding its safe horizon back (``held_by``)."""
    from pgstream.sources.base import OpenContext
    from pgstream.sources.table import TableReader

    for item in items:
        source = app.sources.get(item["source"])
        if source is None:
            continue
        reader = source.open(item["partition"], OpenContext(dsn))
        try:
            head = reader.head()
            done = item["committed_offset"]
            behind = head is not None and (done is None or done < head)
            if behind and isinstance(reader, TableReader):
                item["held_by"] = [h.as_dict() for h in reader.horizon_holders(HOLD_MIN_AGE)]
        finally:
            reader.close()
        if head is not None:
            item["source_head"] = head


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _print_table(items: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not items:
        click.echo("no jobs yet: start one with pgstream run MODULE:APP")
        return
    table = Table(title="pgstream status")
    for col in (
        "job",
        "source",
        "partition",
        "committed",
        "head",
        "lag",
        "last commit",
        "owner",
        "epoch",
        "batches",
        "dead",
    ):
        table.add_column(
            col,
            justify="right"
            if col in {"committed", "head", "lag", "epoch", "batches", "dead"}
            else "left",
        )
    for it in items:
        last = it["last_commit_at"]
        table.add_row(
            it["job"],
            it["source"],
            it["partition"],
            _fmt(it["committed_offset"]),
            _fmt(it["source_head"]),
            _fmt(it["lag"]),
            last.strftime("%Y-%m-%d %H:%M:%S") if last else "-",
            it["owner"] or "-",
            str(it["epoch"]),
            str(it["batches"]),
            str(it["dead_letters"]),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    _print_holders(items)


def _print_holders(items: list[dict[str, Any]]) -> None:
    """Below the table: which sessions hold a table source's safe horizon back, and the fix."""
    from pgstream.sources.table import HorizonHolder

    for it in items:
        holders = it.get("held_by") or []
        if not holders:
            continue
        where = f"{it['job']} {it['source']}/{it['partition']}"
        click.echo(f"{where} is held back by an open transaction (newer rows wait until it ends):")
        for h in holders:
            click.echo(f"  {HorizonHolder(**h).describe()}")
        pids = [str(h["pid"]) for h in holders if h["pid"] is not None]
        fix = "commit or roll back that transaction"
        if pids:
            fix += f" (or end the session: SELECT pg_terminate_backend({pids[0]}))"
        click.echo(f"  fix: {fix}")


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)

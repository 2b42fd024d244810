"""``pgstream status``: per job/source/partition progress, lag, owner and epoch."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from pgstream.cli import dsn_option

STATUS = """
SELECT p.job, p.source, p.partition, p.committed_offset, p.source_head,
       p.last_commit_at, p.owner, p.epoch, p.batches, p.records,
       COALESCE(p.lease_expires_at > now(), false) AS leased,
       (SELECT count(*) FROM pgstream.dead_letters d
         WHERE d.job = p.job AND d.source = p.source AND d.partition = p.partition) AS dead
  FROM pgstream.partitions p
 WHERE %(job)s::text IS NULL OR p.job = %(job)s
 ORDER BY p.job, p.source, p.partition
"""


@click.command("status")
@click.argument("target", metavar="[MODULE:APP]", required=False)
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(target: str | None, dsn: str | None, as_json: bool) -> None:
    """Show committed offset, source head, lag, last commit, owner and epoch per partition.

    With MODULE:APP, only that job, and the source head is read live from its sources
    (otherwise it is the head seen at the last commit)."""
    from pgstream.db.connect import connect, resolve_dsn
    from pgstream.db.migrate import ensure_migrated

    resolved = resolve_dsn(dsn)
    app = None
    if target:
        from pgstream.loader import load_app

        app = load_app(target)
    with connect(resolved, autocommit=True) as conn:
        ensure_migrated(conn)
        rows = conn.execute(STATUS, {"job": app.name if app else None}).fetchall()
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
    items = [dict(zip(names, r)) for r in rows]
    if app is not None:
        _live_heads(app, resolved, items)
    for item in items:
        head, done = item["source_head"], item["committed_offset"]
        item["lag"] = None if head is None or done is None else max(0, head - done)
        if not item["leased"]:
            item["owner"] = None
    if as_json:
        click.echo(json.dumps(items, default=_json_default, indent=2))
        return
    _print_table(items)


def _live_heads(app: Any, dsn: str, items: list[dict[str, Any]]) -> None:
    for item in items:
        source = app.sources.get(item["source"])
        if source is None:
            continue
        reader = source.open(item["partition"], dsn)
        try:
            head = reader.head()
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


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)

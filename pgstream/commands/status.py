"""``pgstream status``: per job/source/partition progress, lag, owner and epoch."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from pgstream.cli import dsn_option

#: the columns of ``queries.STATUS``, the keys of each ``--json`` item (plus ``lag`` and
#: ``held_by``)
COLUMNS = (
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
    "lease_expires_at",
    "watermark",
    "last_commit_age",
    "skipped_ranges",
    "skipped_offsets",
)


@click.command("status")
@click.argument("target", metavar="[MODULE:APP]", required=False)
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--watch", is_flag=True, help="A live table, refreshed every --interval seconds (Ctrl-C ends)."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes of --watch.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="With --watch: stop after N refreshes.",
)
def command(
    target: str | None,
    dsn: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
    count: int | None,
) -> None:
    """Show committed offset, source head, lag, last commit, owner and epoch per partition.

    With MODULE:APP, only that job, and the source head is read live from its sources
    (otherwise it is the head seen at the last commit); a table partition behind its head also
    names the sessions whose open transactions hold its safe horizon back (``held_by``).
    The same data is in the SQL views ``pgstream.partition_status`` and ``pgstream.job_status``.
    """
    from pgstream.db.connect import connect, resolve_dsn
    from pgstream.db.migrate import ensure_migrated

    if watch and as_json:
        raise click.UsageError("--watch shows a live table; --json prints once: pick one")
    resolved = resolve_dsn(dsn)
    app = None
    if target:
        from pgstream.loader import load_app

        app = load_app(target)
    with connect(resolved, autocommit=True) as conn:
        ensure_migrated(conn)
        if watch:
            _watch(conn, app, resolved, interval, count)
            return
        items = read_status(conn, app, resolved)
        from pgstream.db import queries

        job = {"job": app.name if app else None}
        marks = conn.execute(queries.STATUS_JOB_WATERMARKS, job).fetchall()
        backlog = conn.execute(queries.REPARTITION_BACKLOG, job).fetchall()
    _repartition_stages(items, backlog)
    if as_json:
        click.echo(json.dumps(items, default=_json_default, indent=2))
        return
    _print_table(items)
    _print_repartitions(items)
    for job_name, operator, mark, parts, idle in marks:
        at = mark.strftime("%Y-%m-%d %H:%M:%S") if mark else "- (a partition has none yet)"
        click.echo(
            f"{job_name} {operator}: job watermark {at} (min over {parts} partition(s)"
            + (f", {idle} idle left out)" if idle else ")")
        )


def read_status(conn: Any, app: Any, dsn: str) -> list[dict[str, Any]]:
    """One item per partition (of ``app``'s job, or of every job), from the
    ``pgstream.partition_status`` view; with ``app``, heads read live from its sources."""
    from pgstream.db import queries

    rows = conn.execute(queries.STATUS, {"job": app.name if app else None}).fetchall()
    items = [{**dict(zip(COLUMNS, r)), "held_by": None, "stage": None} for r in rows]
    if app is not None:
        _live_heads(app, dsn, items)
    for item in items:
        head, done = item["source_head"], item["committed_offset"]
        item["lag"] = None if head is None or done is None else max(0, head - done)
    return items


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
        "watermark",
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
            it["watermark"].strftime("%Y-%m-%d %H:%M:%S") if it["watermark"] else "-",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    _print_holders(items)
    _print_skips(items)


def _print_skips(items: list[dict[str, Any]]) -> None:
    """Below the table: partitions where a reset policy (``on_lost``) skipped lost ranges."""
    for it in items:
        if it.get("skipped_ranges"):
            click.echo(
                f"{it['job']} {it['source']}/{it['partition']}: {it['skipped_ranges']} range(s), "
                f"{it['skipped_offsets']} offset(s) skipped by policy (the source no longer held "
                "them; see pgstream.skipped_ranges and pgstream verify)"
            )


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


# -- status --watch ---------------------------------------------------------------------------


class _Rates:
    """Records per second of each partition between two refreshes."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def update(self, items: list[dict[str, Any]], now: float) -> None:
        """Set ``item["rate"]`` (None on the first look) and remember this look."""
        for it in items:
            key = (it["job"], it["source"], it["partition"])
            before = self._last.get(key)
            it["rate"] = (
                None
                if before is None or now <= before[0]
                else max(0, it["records"] - before[1]) / (now - before[0])
            )
            self._last[key] = (now, it["records"])


def _watch(conn: Any, app: Any, dsn: str, interval: float, count: int | None) -> None:
    """Refresh a live table every ``interval`` seconds until Ctrl-C (or ``count`` refreshes).
    On a terminal it redraws in place (rich Live); otherwise it prints one table per refresh."""
    import time

    from rich.console import Console
    from rich.live import Live

    from pgstream.db import queries

    console = Console()
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    if live is None:
        console = Console(width=160)
    rates = _Rates()
    shown = 0
    try:
        if live is not None:
            live.start()
        while count is None or shown < count:
            if shown:
                time.sleep(interval)
            items = read_status(conn, app, dsn)
            rates.update(items, time.monotonic())
            jobs = conn.execute(queries.JOB_STATUS, {"job": app.name if app else None})
            view = _watch_table(items, jobs.fetchall())
            if live is not None:
                live.update(view, refresh=True)
            else:
                console.print(view)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()


#: (header, right-aligned) of the --watch table
_WATCH_COLUMNS = (
    ("job", False),
    ("source", False),
    ("partition", False),
    ("committed", True),
    ("head", True),
    ("lag", True),
    ("records/s", True),
    ("last commit", True),
    ("owner", False),
    ("epoch", True),
    ("watermark", False),
    ("dead", True),
)


def _watch_table(items: list[dict[str, Any]], jobs: list[tuple[Any, ...]]) -> Any:
    """The --watch table: a row per partition, a caption line per job."""
    from datetime import datetime, timezone

    from rich.table import Table

    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S UTC")
    table = Table(title=f"pgstream status (live, {stamp})")
    for header, right in _WATCH_COLUMNS:
        table.add_column(header, justify="right" if right else "left")
    for it in items:
        rate = it.get("rate")
        table.add_row(
            it["job"],
            it["source"],
            it["partition"],
            _fmt(it["committed_offset"]),
            _fmt(it["source_head"]),
            _fmt(it["lag"]),
            "-" if rate is None else f"{rate:,.0f}",
            _age(it["last_commit_age"]),
            it["owner"] or "-",
            str(it["epoch"]),
            it["watermark"].strftime("%Y-%m-%d %H:%M:%S") if it["watermark"] else "-",
            str(it["dead_letters"]),
        )
    table.caption = "\n".join(_job_line(*job) for job in jobs) or "no jobs yet"
    return table


def _job_line(
    job: str,
    version: int | None,
    partitions: int,
    owned: int,
    owners: int,
    records: int,
    lag: int | None,
    dead: int,
    watermark: datetime | None,
) -> str:
    """``job "shop" (plan v2): 3/3 partitions owned by 2 workers, 12,345 records, lag 0,
    0 dead letters``."""
    plan = f" (plan v{version})" if version is not None else ""
    line = (
        f'job "{job}"{plan}: {owned}/{partitions} partitions owned by {owners} '
        f"worker{'' if owners == 1 else 's'}, {records:,} records, "
        f"lag {'unknown' if lag is None else f'{lag:,}'}, {dead:,} dead letters"
    )
    if watermark is not None:
        line += f", watermark {watermark:%Y-%m-%d %H:%M:%S}"
    return line


def _age(seconds: float | None) -> str:
    """``4s ago``, ``3m ago``, ``2h ago``; ``-`` before the first commit."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.0f}h ago"

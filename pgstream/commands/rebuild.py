"""``pgstream rebuild``: replay a job (or some of its sinks) into shadow tables and swap them
in atomically with the offsets and the state.

The work is done by :mod:`pgstream.rebuild`; this module parses the command line, shows the
catch-up's progress bar (stderr) and prints what was swapped.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from pgstream.cli import dsn_option, migrated_connection

if TYPE_CHECKING:
    import psycopg

    from pgstream.rebuild import CatchUpProgress, Shadow


@click.command("rebuild")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    metavar="T",
    help="Rebuild only this sink table (repeatable). Default: every sink of the app.",
)
@click.option(
    "--yes",
    is_flag=True,
    help="Do it. Without --yes print what would be rebuilt and exit 0 (nothing starts).",
)
@click.option(
    "--keep-old",
    is_flag=True,
    help="Keep each replaced table as <table>__old instead of dropping it.",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Drop an interrupted rebuild's shadow job and tables and start over.",
)
@click.option(
    "--wait",
    type=float,
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="How long the swap waits for a batch in flight to release a partition row.",
)
def command(
    target: str,
    dsn: str | None,
    sinks: tuple[str, ...],
    yes: bool,
    keep_old: bool,
    restart: bool,
    wait: float,
) -> None:
    """Replay the job from the start into shadow tables created like its sinks (a shadow
    job, <job>~rebuild, resumable after a crash) while the live job keeps serving the old
    tables; once the shadow has caught up, swap the tables in ONE transaction together with
    the offsets, state and ledger, fencing the live workers. Also gives a new sink (added with
    `pgstream run --accept-changes`) its history: rebuild --sink NEW."""
    from pgstream.db.connect import resolve_dsn
    from pgstream.loader import load_app
    from pgstream.rebuild import CatchUp, Shadow, Swapper, select
    from pgstream.rebuild.shadow import check_live_plan

    app = load_app(target)
    selection = select(app, sinks)
    resolved = resolve_dsn(dsn)
    with migrated_connection(resolved) as conn:
        check_live_plan(conn, app, target)
        shadow = Shadow.load(conn, selection)
        if not yes:
            _dry_run(conn, shadow, restart)
            return
        shadow.lock(conn)
        if restart:
            shadow.drop(conn)
            click.echo(f"dropped the earlier rebuild's shadow job {shadow.job!r} and its tables")
        shadow.check_resumable(conn)
        shadow.check_old_tables(conn)
        resumed = shadow.recorded(conn) is not None
        shadow.create_tables(conn)
        click.echo(
            f"{'resuming' if resumed else 'starting'} the rebuild of "
            f"{', '.join(selection.tables)} (shadow job {shadow.job!r})"
        )
        stop = threading.Event()
        with _stop_on_signals(stop), _progress_bar() as show:
            CatchUp(shadow, conn, resolved, progress=show, stop_event=stop).run()
        outcome = Swapper(
            shadow, conn, resolved, lock_wait=wait, keep_old=keep_old, target=target
        ).run()
    for line in outcome.lines:
        click.echo(line)


def _dry_run(conn: psycopg.Connection[Any], shadow: Shadow, restart: bool) -> None:
    from pgstream.rebuild.catchup import offsets

    sel = shadow.selection
    click.echo("dry run: this is what --yes would do")
    for table, pair in shadow.pairs.items():
        click.echo(f"rebuild sink {table} into {pair.shadow}, then swap it in")
    full = set(sel.full_streams)
    live = offsets(conn, sel.app.name, sel.streams)
    for stream in sel.streams:
        how = (
            "fully (ledger and dead letters replaced)"
            if stream in full
            else ("in part (the live ledger and dead letters stay)")
        )
        click.echo(f"stream {stream}: rebuilt {how}")
        for (s, p), offset in live.items():
            if s == stream:
                click.echo(f"  partition {p}: live committed offset {offset}")
    found = shadow.recorded(conn)
    if found is not None:
        done = offsets(conn, shadow.job, sel.streams)
        verb = "dropped (--restart)" if restart else "resumed"
        click.echo(
            f"an interrupted rebuild (shadow job {shadow.job!r}, at "
            f"{', '.join(f'{s}/{p}={o}' for (s, p), o in done.items()) or 'no offset'}) is "
            f"{verb}"
        )
    click.echo("dry run: nothing was changed; run again with --yes to do it")


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM stop the catch-up after the batch in flight (nothing is swapped)."""
    from pgstream.runtime.stopping import stop_on_signal

    handler = stop_on_signal(stop)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _progress_bar() -> Iterator[Any]:
    """A rich progress bar on stderr; yields the callback the catch-up reports to."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("catch-up round {task.fields[round]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records"),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task("catch-up", total=None, round=0)

    def show(p: CatchUpProgress) -> None:
        bar.update(task, completed=p.done, total=max(p.total, 1), round=p.round)

    with bar:
        yield show

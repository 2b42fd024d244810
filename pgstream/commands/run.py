"""``pgstream run MODULE:APP``: run workers until stopped (or idle)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

import click

from pgstream.cli import dsn_option


@click.command("run")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@click.option("--stop-when-idle", is_flag=True, help="Exit 0 once every partition is caught up.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Local worker processes; they share the partitions through leases.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Records per batch.")
@click.option(
    "--max-interval",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds a batch may wait to fill before committing.",
)
@click.option(
    "--accept-changes",
    is_flag=True,
    help="Accept a changed plan (sinks, operators, keys, streams): recorded as a new version.",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def command(
    target: str,
    dsn: str | None,
    stop_when_idle: bool,
    workers: int,
    batch_size: int | None,
    max_interval: float | None,
    accept_changes: bool,
    verbose: int,
) -> None:
    """Run the app MODULE:APP. Several runs (on any machines) share partitions through leases;
    SIGTERM or Ctrl-C stop cleanly after the batch in flight."""
    stop = threading.Event()
    if workers == 1:
        # Stop requests that arrive while the app is still loading end the run cleanly too.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: stop.set())
    from pgstream.db.connect import resolve_dsn
    from pgstream.loader import load_app

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load_app(target)
    resolved = resolve_dsn(dsn)
    if workers > 1 and accept_changes:
        from pgstream.runtime.worker import accept_plan

        accept_plan(app, resolved, target=target)  # once, here: restarted workers never re-accept
    if workers > 1:
        sys.exit(
            _supervise(target, resolved, workers, stop_when_idle, batch_size, max_interval, verbose)
        )
    from pgstream.runtime.worker import run_app

    settings = app.settings.with_overrides(batch_size=batch_size, max_interval=max_interval)
    started = time.monotonic()
    summary = run_app(
        app,
        resolved,
        stop_when_idle=stop_when_idle,
        settings=settings,
        stop_event=stop,
        accept_changes=accept_changes,
        target=target,
    )
    elapsed = time.monotonic() - started
    click.echo(
        f"{app.name}: {summary.records} records in {summary.batches} batches "
        f"({summary.dead_letters} dead letters) in {elapsed:.1f}s",
        err=True,
    )


def _supervise(
    target: str,
    dsn: str,
    workers: int,
    stop_when_idle: bool,
    batch_size: int | None,
    max_interval: float | None,
    verbose: int,
) -> int:
    """Start ``workers`` child processes and forward SIGTERM/SIGINT to them."""
    args = [sys.executable, "-m", "pgstream", "run", target, "--dsn", dsn]
    if stop_when_idle:
        args.append("--stop-when-idle")
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    if max_interval is not None:
        args += ["--max-interval", str(max_interval)]
    if verbose:
        args.append("-" + "v" * verbose)
    children = [subprocess.Popen(args) for _ in range(workers)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)

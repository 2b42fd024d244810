"""``pgstream run MODULE:APP``: run workers until stopped (or idle)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from pgstream.cli import dsn_option
from pgstream.runtime.stopping import stop_on_signal, supervised_handlers

#: shown by default: start, progress and stop lines, and the supervisor's restarts
NOTICE_LOGGERS = ("pgstream.progress", "pgstream.supervisor")


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
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between progress lines on stderr (0: none).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (with --workers N, the "
    "supervisor serves all workers' metrics there).",
)
@click.option(
    "--metrics-host",
    default="0.0.0.0",
    show_default=True,
    metavar="HOST",
    help="The address the metrics endpoint binds (127.0.0.1: this machine only; :: for IPv6).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text or as one JSON object per line (time, level, logger, message, "
    "job, worker, stream, partition).",
)
def command(
    target: str,
    dsn: str | None,
    stop_when_idle: bool,
    workers: int,
    batch_size: int | None,
    max_interval: float | None,
    accept_changes: bool,
    verbose: int,
    progress_interval: float,
    metrics_port: int | None,
    metrics_host: str,
    log_format: str,
) -> None:
    """Run the app MODULE:APP. Several runs (on any machines) share partitions through leases;
    SIGTERM or Ctrl-C stop cleanly after the batch in flight, a second one stops at once."""
    stop = threading.Event()
    if workers == 1:
        # Stop requests that arrive while the app is still loading end the run cleanly too.
        handler = stop_on_signal(stop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
    from pgstream.db.connect import describe_dsn, resolve_dsn
    from pgstream.loader import load_app
    from pgstream.runtime.argv import hide_passwords
    from pgstream.runtime.supervisor import LABEL_ENV, die_with_parent

    ctx = click.get_current_context()
    if metrics_port is None and ctx.get_parameter_source("metrics_host") not in (
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
    ):
        raise click.UsageError("--metrics-host is the address of --metrics-port: give both")
    label = os.environ.get(LABEL_ENV)
    _setup_logging(verbose, label, log_format)
    hide_passwords()
    if label:
        for signum, supervised in supervised_handlers(stop).items():
            signal.signal(signum, supervised)
        die_with_parent()
    app = load_app(target)
    _log_context(log_format, job=app.name)
    resolved = resolve_dsn(dsn)
    where = describe_dsn(resolved)
    if workers > 1 and accept_changes:
        from pgstream.runtime.worker import accept_plan

        accept_plan(app, resolved, target=target)  # once, here: restarted workers never re-accept
    if workers > 1:
        sys.exit(
            _supervise(
                app.name,
                len(app.sources),
                resolved,
                where,
                workers,
                stop_when_idle,
                (metrics_host, metrics_port) if metrics_port is not None else None,
            )
        )
    from pgstream.runtime.progress import ProgressReporter
    from pgstream.runtime.worker import run_app

    settings = app.settings.with_overrides(batch_size=batch_size, max_interval=max_interval)
    who = f"worker {label}" if label else "1 worker"
    progress = ProgressReporter(progress_interval, where, who)
    observers, stop_metrics = _metrics(metrics_port, metrics_host)
    started = time.monotonic()
    try:
        summary = run_app(
            app,
            resolved,
            stop_when_idle=stop_when_idle,
            settings=settings,
            stop_event=stop,
            accept_changes=accept_changes,
            target=target,
            progress=progress,
            observers=observers,
        )
    finally:
        if stop_metrics is not None:
            stop_metrics()
    elapsed = time.monotonic() - started
    line = (
        f"{f'worker {label}: ' if label else ''}{app.name}: {summary.records} records in "
        f"{summary.batches} batches ({summary.dead_letters} dead letters) in {elapsed:.1f}s"
    )
    if log_format == "json":
        logging.getLogger("pgstream.progress").info(line)
    else:
        click.echo(line, err=True)


def _metrics(port: int | None, host: str) -> tuple[list[Any], Callable[[], None] | None]:
    """The metrics observer of this process, and the function that stops its server: served
    here with ``--metrics-port`` (bound to ``host``); in a worker of ``--workers N
    --metrics-port``, written to the supervisor's directory (the supervisor serves them);
    else none."""
    from pgstream.telemetry.metrics import multiprocess_dir

    if port is None and multiprocess_dir() is None:
        return [], None
    from pgstream.telemetry.metrics import MetricsObserver, serve

    observer = MetricsObserver()
    if multiprocess_dir() is not None:
        return [observer], None
    assert port is not None
    return [observer], serve(port, observer.registry, host)


def _log_context(log_format: str, **fields: str) -> None:
    if log_format == "json":
        from pgstream.telemetry.logs import set_context

        set_context(**fields)


def _setup_logging(verbose: int, label: str | None, log_format: str = "text") -> None:
    """Warnings by default, plus the start, progress and stop lines; -v info, -vv debug.

    A worker started by ``--workers N`` names itself in every line (``[worker 2/3]``).
    """
    from pgstream.db.migrate import quiet_alembic_logging

    level = logging.WARNING - 10 * min(verbose, 2)
    if log_format == "json":
        from pgstream.telemetry.logs import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(**({"worker": label} if label else {})))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        who = f"[worker {label}] " if label else ""
        logging.basicConfig(
            level=level, format=f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s"
        )
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(min(level, logging.INFO))
    quiet_alembic_logging(verbose)


def _supervise(
    job: str,
    streams: int,
    dsn: str,
    where: str,
    workers: int,
    stop_when_idle: bool,
    metrics: tuple[str, int] | None,
) -> int:
    """Start ``workers`` child processes of this same command and supervise them; with
    ``metrics`` (host, port), serve their metrics (prometheus-client's multiprocess mode)."""
    from pgstream.runtime.supervisor import Supervisor

    logging.getLogger("pgstream.progress").info(
        'job "%s": %d stream%s; %s; %d workers',
        job,
        streams,
        "" if streams == 1 else "s",
        where,
        workers,
    )
    args = _child_args(click.get_current_context())
    if metrics is None:
        return Supervisor(args, dsn, workers, stop_when_idle=stop_when_idle).run()
    from pgstream.telemetry.metrics import MultiprocessMetrics

    served = MultiprocessMetrics(metrics[1], host=metrics[0])
    try:
        served.start()
        supervisor = Supervisor(
            args,
            dsn,
            workers,
            stop_when_idle=stop_when_idle,
            env=served.env,
            on_exit=served.worker_ended,
        )
        return supervisor.run()
    finally:
        served.close()


#: options the supervisor keeps to itself (``--metrics-port/-host``: it serves the workers'
#: metrics)
_NOT_FOR_WORKERS = ("dsn", "workers", "accept_changes", "metrics_port", "metrics_host")


def _child_args(ctx: click.Context) -> list[str]:
    """This command line for one worker: every option given, except ``--dsn`` (the DSN goes
    in the child's environment, never on a command line), ``--workers`` and
    ``--accept-changes`` (the supervisor accepts a changed plan once, before it starts them)."""
    args = [sys.executable, "-m", "pgstream", "run", str(ctx.params["target"])]
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or name is None or name in _NOT_FOR_WORKERS:
            continue
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        value = ctx.params[name]
        opt = max(param.opts, key=len)
        if param.count:
            args += [opt] * int(value)
        elif param.is_flag:
            if value:
                args.append(opt)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                args += [opt, *_strings(item)]
        elif value is not None:
            args += [opt, *_strings(value)]
    return args


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, tuple) else [str(value)]

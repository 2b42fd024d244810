"""``pgstream dlq list|show|redrive``: inspect dead letters and redrive them exactly once.

The work is done by :mod:`pgstream.redrive`; this module parses the command line and prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pgstream.cli import dsn_option, migrated_connection

if TYPE_CHECKING:
    from pgstream.api import App
    from pgstream.redrive import DeadLetterRow, Filters, RedriveReport

F = TypeVar("F", bound=Callable[..., Any])

#: rows `dlq list` prints unless --limit says otherwise
LIST_LIMIT = 100


@click.group("dlq")
def command() -> None:
    """Inspect a job's dead letters; redrive them through today's code, exactly once."""


def _filter_options(func: F) -> F:
    """The shared selection options (passed as keyword arguments)."""
    options = [
        click.option("--source", "--stream", "source", metavar="S", help="Only stream S."),
        click.option("--partition", metavar="P", help="Only partition P."),
        click.option(
            "--operator",
            metavar="TEXT",
            help="Only operators whose label contains TEXT "
            "(e.g. to_table(facts), aggregate->totals, decode, sink, worker).",
        ),
        click.option(
            "--error",
            metavar="TEXT",
            help="Only dead letters whose error (or latest redrive error) contains TEXT "
            "(case-insensitive).",
        ),
        click.option("--from-offset", type=int, metavar="N", help="Only offsets >= N."),
        click.option("--to-offset", type=int, metavar="N", help="Only offsets < N."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filters(status: str, kw: dict[str, Any]) -> Filters:
    from pgstream.redrive import Filters

    return Filters(
        source=kw["source"],
        partition=kw["partition"],
        operator=kw["operator"],
        error=kw["error"],
        from_offset=kw["from_offset"],
        to_offset=kw["to_offset"],
        status=status,  # type: ignore[arg-type]
    )


def _load(target: str) -> App:
    from pgstream.loader import load_app

    return load_app(target)


@command.command("list")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@_filter_options
@click.option(
    "--status",
    type=click.Choice(["open", "redriven", "all"]),
    default="open",
    show_default=True,
    help="open: not redriven yet; redriven: their effect was written by a redrive.",
)
@click.option("--limit", type=int, default=LIST_LIMIT, show_default=True, help="At most N rows.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a JSON list).")
def list_command(
    target: str, dsn: str | None, status: str, limit: int, as_json: bool, **kw: Any
) -> None:
    """The job's dead letters, oldest first: id, where, operator, error, redrive state."""
    from pgstream.redrive import count_dead_letters, list_dead_letters

    app = _load(target)
    filters = _filters(status, kw)
    with migrated_connection(dsn) as conn:
        rows = list_dead_letters(conn, app.name, filters, limit)
        opened, redriven = count_dead_letters(conn, app.name, filters)
    if as_json:
        click.echo(json.dumps([r.as_json() for r in rows], indent=2))
        return
    if not rows:
        click.echo(f"no {'' if status == 'all' else status + ' '}dead letters match")
        return
    _print_table(rows)
    total = opened + redriven
    more = f" (showing {len(rows)}; --limit N for more)" if total > len(rows) else ""
    click.echo(f"{total} dead letter(s) match: {opened} open, {redriven} redriven{more}")


def _print_table(rows: list[DeadLetterRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pgstream dead letters")
    for col in ("id", "stream", "partition", "offset", "operator", "error", "status"):
        table.add_column(col, justify="right" if col in {"id", "offset"} else "left")
    for r in rows:
        state = "redriven" if r.redriven else "open"
        if r.redrive_attempts and not r.redriven:
            state = f"open ({r.redrive_attempts} redrive(s) failed)"
        table.add_row(
            str(r.id),
            r.source,
            r.partition,
            str(r.offset),
            r.operator or "",
            _short(r.redrive_error or r.error),
            state,
        )
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)


def _short(text: str, width: int = 80) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


@command.command("show")
@click.argument("target", metavar="MODULE:APP")
@click.argument("dead_letter_id", metavar="ID", type=int)
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_command(target: str, dead_letter_id: int, dsn: str | None, as_json: bool) -> None:
    """One dead letter: where it came from, its error (with the user code's file and line),
    its redrive history and its payload."""
    from pgstream.errors import ConfigError
    from pgstream.redrive import show_dead_letter

    app = _load(target)
    with migrated_connection(dsn) as conn:
        row = show_dead_letter(conn, app.name, dead_letter_id)
    if row is None:
        raise ConfigError(
            f"job {app.name!r} has no dead letter with id {dead_letter_id}",
            hint=f"list them with `pgstream dlq list {target} --status all`",
        )
    if as_json:
        click.echo(json.dumps(row.as_json(), indent=2))
        return
    click.echo(f"dead letter {row.id} of job {app.name}")
    click.echo(f"  from:      {row.source}/{row.partition} offset {row.offset}")
    click.echo(f"  operator:  {row.operator or '-'}")
    click.echo(f"  created:   {row.created_at.isoformat()}")
    state = "redriven" if row.redriven else "open"
    click.echo(f"  status:    {state}, {row.redrive_attempts} redrive attempt(s)")
    if row.redriven_at is not None:
        click.echo(f"  redriven:  {row.redriven_at.isoformat()}: {row.redrive_outcome}")
    if row.redrive_error:
        click.echo(f"  latest redrive error: {row.redrive_error}")
    click.echo("  error:")
    for line in row.error.splitlines():
        click.echo(f"    {line}")
    click.echo(f"  payload ({row.payload_bytes or 0} bytes):")
    click.echo(f"    {_payload_text(row.payload)}")


def _payload_text(payload: bytes | None, limit: int = 4000) -> str:
    if payload is None:
        return "(none kept)"
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        text = "hex " + payload[: limit // 2].hex()
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more)"


@command.command("redrive")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@_filter_options
@click.option(
    "--chunk",
    type=int,
    default=500,
    show_default=True,
    help="Dead letters per transaction.",
)
@click.option(
    "--yes",
    is_flag=True,
    help="Do it. Without --yes run every chunk and roll it back (a dry run: what would be "
    "redriven and what would fail again) and exit 0.",
)
def redrive_command(target: str, dsn: str | None, chunk: int, yes: bool, **kw: Any) -> None:
    """Re-run the selected open dead letters through today's code and write their effects
    exactly once: per chunk, ONE transaction writes the outputs and marks the dead letters
    redriven (or leaves them open with the new error). Running it again, or after a crash,
    changes nothing more."""
    from pgstream.db.connect import resolve_dsn
    from pgstream.redrive import Redriver

    app = _load(target)
    filters = _filters("open", kw)
    resolved = resolve_dsn(dsn)
    with migrated_connection(resolved) as conn:
        report = Redriver(app, conn, filters, chunk, dsn=resolved).run(apply=yes)
    _print_report(report, yes)


def _print_report(report: RedriveReport, applied: bool) -> None:
    if not report.redriven and not report.failed:
        click.echo("no open dead letters match: nothing to redrive")
        return
    verb = "redriven" if applied else "would be redriven"
    if not applied:
        click.echo("dry run: this is what --yes would do")
    click.echo(f"{report.redriven} dead letter(s) {verb} ({report.rows} sink rows written)")
    if report.failed:
        still = "still fail" if applied else "would still fail"
        click.echo(f"{report.failed} {still} and stay open:")
        for error, n in report.errors.most_common(5):
            click.echo(f"  {n} x {_short(error, 160)}")
    if not applied:
        click.echo("dry run: nothing was changed; run again with --yes to do it")

"""``pgstream job list|rename|reset|retire``: inspect stored jobs and change them explicitly.

The work is done by :mod:`pgstream.admin` (one fenced transaction per command); this module
parses the command line and prints what was (or, in a dry run, would be) done.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from pgstream.cli import dsn_option, migrated_connection

if TYPE_CHECKING:
    from pgstream.admin import Outcome
    from pgstream.api import App

YES_HELP = "Do it. Without --yes only print what would be done (a dry run) and exit 0."


@click.group("job")
def command() -> None:
    """List stored jobs; rename, reset or retire what a job has stored."""


def _load(target: str) -> App:
    from pgstream.loader import load_app

    return load_app(target)


def _print(outcome: Outcome, dry_run_note: bool) -> None:
    dry_run = dry_run_note and not outcome.applied and len(outcome.lines) > 1
    if dry_run:
        click.echo("dry run: this is what --yes would do")
    for line in outcome.lines:
        click.echo(line)
    if dry_run:
        click.echo("dry run: nothing was changed; run again with --yes to do it")


@command.command("list")
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(dsn: str | None, as_json: bool) -> None:
    """Every job in the database: streams, partitions, committed offsets, plan version and
    last change, and orphan streams (checkpoint rows of streams its recorded plan lacks)."""
    from pgstream.admin import list_jobs

    with migrated_connection(dsn) as conn:
        jobs = list_jobs(conn)
    if as_json:
        click.echo(json.dumps(jobs, default=_json_default, indent=2))
        return
    if not jobs:
        click.echo("no jobs yet: start one with pgstream run MODULE:APP")
    for job in jobs:
        _print_job(job)


def _print_job(job: dict[str, Any]) -> None:
    if job["plan_version"] is None:
        plan = "no recorded plan (it last ran before plans were recorded)"
    else:
        when = _when(job["plan_changed_at"])
        change = (job["last_change"] or "first recorded plan").strip().splitlines()[0]
        plan = f"plan version {job['plan_version']}, last change {when}: {change}"
    click.echo(f"job {job['job']}: {plan}")
    for stream in job["streams"]:
        tag = "  ORPHAN: not in the recorded plan" if stream["orphan"] else ""
        click.echo(
            f"  stream {stream['stream']}: {len(stream['partitions'])} partition(s), "
            f"{stream['dead_letters']} dead letter(s){tag}"
        )
        for p in stream["partitions"]:
            offset = "-" if p["committed_offset"] is None else p["committed_offset"]
            owner = f", owner {p['owner']}" if p["owner"] else ""
            click.echo(
                f"    partition {p['partition']}: committed {offset}, {p['records']} record(s) "
                f"in {p['batches']} batch(es), last commit {_when(p['last_commit_at'])}, "
                f"epoch {p['epoch']}{owner}"
            )
    for name in job["orphan_streams"]:
        click.echo(
            f"  hint: stream {name} is no longer in the job's plan; drop its checkpoint with "
            f"pgstream job retire MODULE:APP --stream {name} --yes, or if it was renamed, "
            f"pgstream job rename MODULE:APP --stream {name}=NEW"
        )


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S%z") if value else "-"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _parse_rename(values: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            raise click.BadParameter(f"expected OLD=NEW, got {value!r}", param_hint="--stream")
        pairs.append((old, new))
    return pairs


@command.command("rename")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@click.option(
    "--from-job",
    "from_job",
    metavar="OLD_JOB",
    help="The App was renamed: OLD_JOB's checkpoint becomes the app's (App(...) name in the code).",
)
@click.option(
    "--stream",
    "streams",
    metavar="OLD=NEW",
    multiple=True,
    help="Stream OLD was renamed to NEW in the code: NEW continues from OLD's offsets "
    "(repeatable).",
)
def rename_command(
    target: str, dsn: str | None, from_job: str | None, streams: tuple[str, ...]
) -> None:
    """After renaming the App or a stream in the code, carry the old name's checkpoint over
    (offsets, ledger, fold state, dead letters, append sink _source, recorded plan) in one
    transaction, so the next run continues where the old name stopped. Stop the job first."""
    from pgstream.admin import rename

    pairs = _parse_rename(streams)
    app = _load(target)
    with migrated_connection(dsn) as conn:
        outcome = rename(conn, app, from_job=from_job, streams=pairs)
    _print(outcome, dry_run_note=False)
    click.echo("done: the next `pgstream run` continues from the old offsets")


@command.command("reset")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@click.option("--stream", "stream", metavar="S", required=True, help="The stream to reset.")
@click.option(
    "--delete-outputs",
    is_flag=True,
    help="Also delete the stream's rows in its append sinks, so re-read records are "
    "written again (aggregate and fold sinks are never retracted).",
)
@click.option("--yes", is_flag=True, help=YES_HELP)
def reset_command(
    target: str, dsn: str | None, stream: str, delete_outputs: bool, yes: bool
) -> None:
    """Forget stream S's checkpoint (offsets, ledger, fold state, dead letters) so the next
    run reads it from the start. Says what happens to each sink first; needs --yes."""
    from pgstream.admin import reset

    app = _load(target)
    with migrated_connection(dsn) as conn:
        outcome = reset(conn, app, stream, delete_outputs=delete_outputs, apply=yes)
    _print(outcome, dry_run_note=not yes)
    if outcome.applied:
        click.echo(f"done: the next `pgstream run` reads {stream!r} from the start")


@command.command("retire")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@click.option("--stream", "stream", metavar="S", required=True, help="The removed stream.")
@click.option("--yes", is_flag=True, help=YES_HELP)
def retire_command(target: str, dsn: str | None, stream: str, yes: bool) -> None:
    """Drop the checkpoint rows (offsets, ledger, fold state) of stream S, which was removed
    from the app's code. Sink rows and dead letters are kept. Needs --yes."""
    from pgstream.admin import retire

    app = _load(target)
    with migrated_connection(dsn) as conn:
        outcome = retire(conn, app, stream, apply=yes)
    _print(outcome, dry_run_note=not yes)
    if outcome.applied:
        click.echo(f"done: stream {stream!r} is retired")

"""``pgstream rewind``: move a partition's committed offset back and retract exactly the
effects of the records beyond it, in one fenced transaction.

The work is done by :mod:`pgstream.rewind`; this module parses the command line and prints.
"""

from __future__ import annotations

import click

from pgstream.cli import dsn_option


@click.command("rewind")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@click.option(
    "--source", "--stream", "source", required=True, metavar="S", help="The stream to rewind."
)
@click.option(
    "--to",
    "to",
    type=int,
    metavar="OFFSET",
    help="Records with offset >= OFFSET are processed again (a batch boundary).",
)
@click.option(
    "--to-time",
    "to_time",
    metavar="TIME",
    help="Rewind to the batch boundary TIME means: ISO-8601 with a timezone, or a time ago "
    "(-15m, 2h). Mapped through the source's record times where it has them (Kafka, NATS, "
    "Redis), else through the ledger (undo what was committed since TIME).",
)
@click.option(
    "--partition", metavar="P", help="The partition (needed when the stream has several)."
)
@click.option(
    "--wait",
    type=float,
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for a batch in flight to release the partition row.",
)
@click.option(
    "--yes",
    is_flag=True,
    help="Do it. Without --yes run the transaction and roll it back (a dry run: what would "
    "be retracted) and exit 0.",
)
def command(
    target: str,
    dsn: str | None,
    source: str,
    to: int | None,
    to_time: str | None,
    partition: str | None,
    wait: float,
    yes: bool,
) -> None:
    """Move a partition's committed offset back to OFFSET (or the batch boundary TIME
    means) and, in the same transaction, retract exactly the effects of the records beyond
    it (append rows, count/sum/avg deltas, dead letters, late records, ledger). A running
    worker is fenced. Streams with effects that cannot be retracted exactly (min/max, folds,
    windows with grace or final, repartitions, @app.batch handlers, lookups) are refused."""
    from pgstream.db.connect import connect, resolve_dsn
    from pgstream.db.migrate import ensure_migrated
    from pgstream.loader import load_app
    from pgstream.rewind import Rewinder
    from pgstream.rewindtime import parse_time, resolve_time

    if (to is None) == (to_time is None):
        raise click.UsageError("give exactly one of --to OFFSET and --to-time TIME")
    app = load_app(target)
    resolved = resolve_dsn(dsn)
    with connect(resolved, autocommit=True) as conn:
        ensure_migrated(conn)
        rewinder = Rewinder(app, conn, resolved, lock_wait=wait)
        part = rewinder.partition_of(source, partition)
        if to_time is not None:
            when = parse_time(conn, to_time)
            found = resolve_time(conn, app, source, part, when, resolved)
            for line in found.lines:
                click.echo(line)
            if found.to is None:
                return
            to = found.to
        assert to is not None
        outcome = rewinder.run(rewinder.target(source, part, to), apply=yes)
    dry_run = not outcome.applied and len(outcome.lines) > 1
    if dry_run:
        click.echo("dry run: this is what --yes would do")
    for line in outcome.lines:
        click.echo(line)
    if dry_run:
        click.echo("dry run: nothing was changed; run again with --yes to do it")

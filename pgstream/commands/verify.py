"""``pgstream verify MODULE:APP``: audit a job's exactly-once invariants.

Exit 0 when clean, 1 with a report naming every violation, 2 when the audit cannot be
carried out (the reason is printed).
"""

from __future__ import annotations

import json
import sys

import click

from pgstream.cli import dsn_option

#: the exit code when the audit cannot be carried out (0 clean and 1 violations come from
#: ``VerifyReport.exit_code``)
EXIT_CANNOT_CHECK = 2


@click.command("verify")
@click.argument("target", metavar="MODULE:APP")
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option(
    "--max-report", type=click.IntRange(min=0), default=200, show_default=True,
    help="Most violations listed one per line (the counts always cover all of them).",
)
def command(target: str, dsn: str | None, as_json: bool, max_report: int) -> None:
    """Audit MODULE:APP against its own sources: the ledger tiles every partition up to its
    committed offset; re-reading each source and re-applying the app's operators gives exactly
    the append sink rows plus the dead letters, each once; nothing is stored above a committed
    offset; keyed aggregates and folds equal a recomputation. Exit 0 clean, 1 violations,
    2 cannot check."""
    from pgstream.errors import PgStreamError
    from pgstream.verify import CannotVerify, verify_app

    try:
        from pgstream.db.connect import resolve_dsn
        from pgstream.loader import load_app

        app = load_app(target)
        report = verify_app(app, resolve_dsn(dsn))
    except (CannotVerify, PgStreamError) as exc:
        _cannot(str(exc), as_json)
        return
    except Exception as exc:  # a database error: still "cannot check", never a traceback
        import psycopg

        if not isinstance(exc, psycopg.Error):
            raise
        _cannot(f"database error: {str(exc).strip().splitlines()[0]}", as_json)
        return
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        for v in report.violations[:max_report]:
            click.echo(v.describe())
        hidden = len(report.violations) - max_report
        if hidden > 0:
            click.echo(f"... and {hidden} more violation(s)")
        for note in report.unchecked:
            click.echo(f"note: not checked: {note}")
        for line in report.skipped:
            click.echo(f"note: {line}")
        click.echo(report.summary())
    sys.exit(report.exit_code)


def _cannot(reason: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": None, "cannot_check": reason}))
    click.echo(f"error: cannot verify: {reason}", err=True)
    sys.exit(EXIT_CANNOT_CHECK)

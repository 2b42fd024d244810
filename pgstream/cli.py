"""The ``pgstream`` command line.

Structure (easy to extend without editing this file):

* :data:`main` is the top-level click group. Errors are handled centrally: a
  :class:`~pgstream.errors.PgStreamError` (or a database connection failure) prints
  ``error: <message>`` and an optional ``  hint: ...`` line to stderr and exits with the
  error's ``exit_code`` — never a traceback.
* Commands live in modules ``pgstream/commands/<name>.py``; each module exposes a click
  command as ``command`` (or as an attribute named like the module). They are discovered
  and imported lazily, so ``pgstream db upgrade`` does not import the runtime. The command
  is called ``<name>`` with ``_`` replaced by ``-``. Commands may also be registered
  directly with ``@main.command()`` / ``main.add_command(...)``.
* Every command that talks to a database takes ``--dsn DSN`` after its name through
  :func:`dsn_option`, and resolves it with :func:`pgstream.db.connect.resolve_dsn`
  (``--dsn``, ``$PGSTREAM_DSN``, ``$DATABASE_URL``, else the embedded server).

Example ``pgstream/commands/status.py``::

    import click
    from pgstream.cli import dsn_option
    from pgstream.db.connect import resolve_dsn

    @click.command()
    @dsn_option
    def command(dsn: str | None) -> None:
        \"\"\"Show per-partition progress.\"\"\"
        dsn = resolve_dsn(dsn)
        ...
"""

from __future__ import annotations

import atexit
import gc
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pgstream.errors import PgStreamError

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgStreamGroup", "dsn_option", "main", "migrated_connection", "report_error"]

F = TypeVar("F", bound=Callable[..., Any])

COMMANDS_PACKAGE = "pgstream.commands"

DSN_HELP = (
    "PostgreSQL to use (postgresql://user@host:port/db or 'host=... dbname=...'). "
    "Default: $PGSTREAM_DSN, then $DATABASE_URL, else the embedded server."
)


def dsn_option(func: F) -> F:
    """Add the shared ``--dsn DSN`` option (passed as ``dsn: str | None``) to a command."""
    return click.option("--dsn", "dsn", metavar="DSN", default=None, help=DSN_HELP)(func)


@contextmanager
def migrated_connection(dsn: str | None) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the database a command's ``--dsn`` selects (or the
    default), once its ``pgstream`` schema is known to be at head."""
    from pgstream.db.connect import connect, resolve_dsn
    from pgstream.db.migrate import ensure_migrated

    with connect(resolve_dsn(dsn), autocommit=True) as conn:
        ensure_migrated(conn)
        yield conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as ``error: ...`` (+ hint) on stderr; return the exit code to use.

    Returns ``-1`` for exceptions that are not user-facing errors (the caller re-raises).
    """
    if isinstance(exc, PgStreamError):
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
        return exc.exit_code

    import psycopg

    orig: BaseException = exc
    try:
        from sqlalchemy.exc import DBAPIError

        if isinstance(exc, DBAPIError) and exc.orig is not None:
            orig = exc.orig
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        pass
    if isinstance(orig, psycopg.Error) and orig.sqlstate == "42501":
        from pgstream.db.privileges import explain_denied

        message, hint = explain_denied(str(orig))
        click.echo(f"error: {message}", err=True)
        click.echo(f"  hint: {hint}", err=True)
        return 1
    if isinstance(orig, psycopg.OperationalError):
        click.echo(f"error: database error: {_first_line(orig)}", err=True)
        click.echo("  hint: is the server running? check --dsn / PGSTREAM_DSN", err=True)
        return 1
    if isinstance(orig, psycopg.Error):
        click.echo(f"error: database error: {_first_line(orig)}", err=True)
        return 1
    return -1


class PgStreamGroup(click.Group):
    """A click group with central error handling and lazy ``pgstream.commands`` discovery."""

    def _module_names(self) -> list[str]:
        try:
            package = importlib.import_module(COMMANDS_PACKAGE)
        except ImportError:
            return []
        paths = getattr(package, "__path__", None)
        if not paths:
            return []
        return sorted(
            info.name for info in pkgutil.iter_modules(paths) if not info.name.startswith("_")
        )

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        if self.parent_is_root(ctx):
            names.update(name.replace("_", "-") for name in self._module_names())
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or not self.parent_is_root(ctx):
            return command
        module_name = cmd_name.replace("-", "_")
        if module_name not in self._module_names():
            return None
        module = importlib.import_module(f"{COMMANDS_PACKAGE}.{module_name}")
        found = getattr(module, "command", None) or getattr(module, module_name, None)
        if not isinstance(found, click.Command):
            raise click.ClickException(
                f"{COMMANDS_PACKAGE}.{module_name} defines no click command "
                "(expected an attribute named 'command')"
            )
        return found

    def parent_is_root(self, ctx: click.Context) -> bool:
        """Discovery applies to the top-level group only."""
        return ctx.parent is None

    def invoke(self, ctx: click.Context) -> Any:
        """Invoke the command; user-facing errors become one ``error:`` line and an exit code."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            code = report_error(exc)
            if code < 0:
                raise
            ctx.exit(code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pgstream-engine")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "unknown"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: looked up only when asked (reading package metadata costs start-up)."""
    if value and not ctx.resilient_parsing:
        click.echo(f"pgstream, version {_version()}")
        ctx.exit()


@click.group(cls=PgStreamGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
    help="Show the version and exit.",
)
def main() -> None:
    """pgstream: exactly-once stream processing where PostgreSQL is the checkpoint."""


def entry() -> None:
    """The ``pgstream`` executable (and ``python -m pgstream``): :func:`main` in a process
    of its own, which skips the garbage collector's last full pass over every object at exit
    (tens of milliseconds of a short run; the process ends anyway)."""
    atexit.register(gc.freeze)  # atexit runs before the interpreter's final collection
    main(prog_name="pgstream")


@main.group("db")
def db() -> None:
    """Manage pgstream's own schema (Alembic migrations)."""


@db.command("upgrade")
@dsn_option
@click.argument("revision", default="head", required=False)
def db_upgrade(dsn: str | None, revision: str) -> None:
    """Apply pgstream's migrations up to REVISION (default: head)."""
    from pgstream.db import migrate
    from pgstream.db.connect import describe_dsn, resolve_dsn

    resolved = resolve_dsn(dsn)
    before = migrate.current(resolved)
    migrate.upgrade(resolved, revision)
    after = migrate.current(resolved)
    where = describe_dsn(resolved)
    if before == after:
        click.echo(f"pgstream schema in {where} is already at revision {after}")
    else:
        click.echo(f"pgstream schema in {where} upgraded: {before or 'none'} -> {after}")


@db.command("downgrade")
@dsn_option
@click.argument("revision")
def db_downgrade(dsn: str | None, revision: str) -> None:
    """Revert pgstream's migrations down to REVISION ('base' removes the schema)."""
    from pgstream.db import migrate
    from pgstream.db.connect import describe_dsn, resolve_dsn

    resolved = resolve_dsn(dsn)
    before = migrate.current(resolved)
    migrate.downgrade(resolved, revision)
    after = migrate.current(resolved)
    click.echo(
        f"pgstream schema in {describe_dsn(resolved)} downgraded: "
        f"{before or 'none'} -> {after or 'none (base)'}"
    )


@db.command("current")
@dsn_option
def db_current(dsn: str | None) -> None:
    """Show the revision the database is at (and whether it is the newest)."""
    from pgstream.db import migrate
    from pgstream.db.connect import resolve_dsn

    resolved = resolve_dsn(dsn)
    at = migrate.current(resolved)
    need = migrate.head()
    if at is None:
        click.echo(f"none (not migrated; head is {need}; run: pgstream db upgrade)")
    elif at == need:
        click.echo(f"{at} (head)")
    else:
        click.echo(f"{at} (head is {need}; run: pgstream db upgrade)")


@db.command("grant")
@click.argument("role")
@click.option(
    "--app", "target", metavar="MODULE:APP", default=None,
    help="Also print the grants on this app's source and sink tables.",
)
@dsn_option
def db_grant(role: str, target: str | None, dsn: str | None) -> None:
    """Print the GRANTs runtime ROLE needs (pipe them to psql as the objects' owner).

    Without --app: the pgstream schema's part, run as the role that runs `pgstream db
    upgrade` (with ALTER DEFAULT PRIVILEGES, so later migrations stay granted). With --app:
    also SELECT on its sources and the privileges its sinks need, run as their owner."""
    from pgstream.db.privileges import grant_statements

    if target is None:
        click.echo("\n".join(grant_statements(role)))
        return
    from pgstream.db.connect import connect, resolve_dsn
    from pgstream.loader import load_app

    app = load_app(target)
    with connect(resolve_dsn(dsn), autocommit=True) as conn:
        click.echo("\n".join(grant_statements(role, app, conn)))


if __name__ == "__main__":  # pragma: no cover
    entry()

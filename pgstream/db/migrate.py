"""Applying pgstream's Alembic migrations (the ``pgstream`` schema) without an alembic.ini.

The migration scripts live in ``migrations/`` at the top of a source checkout and are
shipped in the wheel as ``pgstream/_migrations``. Only the ``pgstream`` schema is ever
looked at or changed: user tables in other schemas are invisible to these migrations.
"""

from __future__ import annotations

import ast
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgstream.db import queries
from pgstream.db.connect import connect, describe_dsn, safe_dsn, sqlalchemy_url
from pgstream.db.queries import SCHEMA
from pgstream.errors import DatabaseError

__all__ = [
    "ADVISORY_LOCK_KEY",
    "VERSION_TABLE",
    "config",
    "current",
    "current_on",
    "downgrade",
    "ensure_migrated",
    "head",
    "include_name",
    "migration_context_options",
    "quiet_alembic_logging",
    "schema_diff",
    "script_location",
    "upgrade",
]

VERSION_TABLE = "alembic_version"

#: ``pg_advisory_xact_lock`` key held by every migration run, so concurrent upgrades queue.
ADVISORY_LOCK_KEY = 0x7067737472_6D67  # "pgstrmg"

# Alembic keeps the running migration in module globals (``alembic.context``/``alembic.op``),
# so runs in one process must not overlap; the advisory lock covers other processes.
_ALEMBIC_LOCK = threading.RLock()


def quiet_alembic_logging(verbose: int) -> None:
    """Hide Alembic's INFO lines (plugin set-up, context notes) unless ``verbose >= 2``.

    ``pgstream run -v`` then shows pgstream's own lines only; ``-vv`` shows everything.
    """
    if verbose < 2:
        logging.getLogger("alembic").setLevel(logging.WARNING)


def script_location() -> Path:
    """The directory holding ``env.py`` and ``versions/``.

    ``pgstream/_migrations`` in an installed wheel, ``<repo>/migrations`` in a source or
    editable checkout.
    """
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir / "_migrations", package_dir.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise DatabaseError(
        f"pgstream's migration scripts are missing (looked in {package_dir / '_migrations'} "
        f"and {package_dir.parent / 'migrations'})",
        hint="reinstall pgstream-engine",
    )


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic ``include_name`` hook: only the ``pgstream`` schema exists for autogenerate."""
    if type_ == "schema":
        return name == SCHEMA
    return True


def migration_context_options() -> dict[str, Any]:
    """Options for ``context.configure`` / ``MigrationContext.configure`` shared by all uses."""
    from pgstream.db.tables import metadata

    return {
        "target_metadata": metadata,
        "version_table": VERSION_TABLE,
        "version_table_schema": SCHEMA,
        "include_schemas": True,
        "include_name": include_name,
        "compare_type": True,
        "compare_server_default": True,
    }


def config(dsn: str | None = None, connection: Any = None) -> Any:
    """Build an ``alembic.config.Config`` in code (no alembic.ini).

    ``connection`` (a SQLAlchemy ``Connection``) is handed to ``env.py`` through
    ``config.attributes["connection"]``; otherwise ``dsn`` becomes ``sqlalchemy.url``.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    if dsn is not None:
        # ConfigParser interpolates '%', so escape it.
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(dsn).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def _sa_connection(dsn: str) -> Iterator[Any]:
    """A SQLAlchemy connection in a transaction (committed on success), opened via libpq."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    connect(dsn).close()  # fail early with a clear DatabaseError if unreachable
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: connect(dsn), poolclass=NullPool
    )
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision known to this version of pgstream."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(config())
    revision = script.get_current_head()
    if revision is None:  # pragma: no cover - the package always ships revisions
        raise DatabaseError("pgstream ships no migrations", hint="reinstall pgstream-engine")
    return revision


#: a revision file's ``revision = "..."`` / ``down_revision = ...`` line (annotation optional)
_REVISION_LINE = re.compile(r"^(down_)?revision\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.MULTILINE)


def declared_head() -> str | None:
    """The head revision read from the revision files' own ``revision`` and
    ``down_revision`` lines, without importing Alembic (start-up's fast path); ``None``
    unless every file states both as plain literals and there is exactly one head."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (script_location() / "versions").glob("*.py"):
        found = {bool(m[1]): m[2] for m in _REVISION_LINE.finditer(path.read_text())}
        if set(found) != {False, True}:
            return None
        try:
            revision, down = ast.literal_eval(found[False]), ast.literal_eval(found[True])
        except (ValueError, SyntaxError):
            return None
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        parents |= {down} if isinstance(down, str) else set(down or ())
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def upgrade(dsn: str, revision: str = "head") -> None:
    """Migrate the ``pgstream`` schema in ``dsn`` up to ``revision`` (default: head).

    Safe to run concurrently: runs queue on an advisory lock and the later ones find
    nothing left to do.
    """
    from alembic import command

    with _ALEMBIC_LOCK, _sa_connection(dsn) as conn:
        command.upgrade(config(connection=conn), revision)


def downgrade(dsn: str, revision: str) -> None:
    """Migrate the ``pgstream`` schema down to ``revision`` (``base`` drops it entirely)."""
    from alembic import command

    with _ALEMBIC_LOCK, _sa_connection(dsn) as conn:
        command.downgrade(config(connection=conn), revision)


def current_on(conn: psycopg.Connection[Any]) -> str | None:
    """The revision the database behind ``conn`` is at, or ``None`` if never migrated."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        # One round trip (start-up's path): outside a transaction, a missing version table
        # is an error that spoils nothing.
        try:
            rows = conn.execute(queries.MIGRATION_REVISIONS).fetchall()
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            return None
    else:
        with conn.transaction():
            row = conn.execute(queries.HAS_VERSION_TABLE).fetchone()
            if not row or not row[0]:
                return None
            rows = conn.execute(queries.MIGRATION_REVISIONS).fetchall()
    if not rows:
        return None
    return ",".join(str(r[0]) for r in rows)


def current(dsn: str) -> str | None:
    """The revision the database at ``dsn`` is at, or ``None`` if never migrated."""
    with connect(dsn, autocommit=True) as conn:
        return current_on(conn)


def ensure_migrated(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`DatabaseError` unless the ``pgstream`` schema is at :func:`head`
    (Alembic is imported only when it is not at :func:`declared_head`)."""
    at = current_on(conn)
    if at is not None and at == declared_head():
        return
    need = head()
    if at == need:
        return
    info = conn.info
    dsn = safe_dsn(
        make_conninfo(host=info.host, port=info.port, user=info.user, dbname=info.dbname)
    )
    where = describe_dsn(dsn)
    from alembic.script import ScriptDirectory

    known = {rev.revision for rev in ScriptDirectory.from_config(config()).walk_revisions()}
    if at is not None and at not in known:
        raise DatabaseError(
            f"the pgstream schema in {where} is at revision {at}, which this version of "
            f"pgstream does not know (it needs {need})",
            hint="upgrade pgstream-engine to the version that migrated this database",
        )
    raise DatabaseError(
        f"the pgstream schema is not migrated in {where} (at revision {at}, need {need}); "
        f"run: pgstream db upgrade --dsn '{dsn}'"
    )


def schema_diff(dsn: str) -> list[Any]:
    """Differences between the ``pgstream`` schema in ``dsn`` and ``tables.metadata``.

    Alembic's autogenerate comparison; an empty list means no drift.
    """
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with _ALEMBIC_LOCK, _sa_connection(dsn) as conn:
        opts = migration_context_options()
        metadata = opts.pop("target_metadata")
        ctx = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(ctx, metadata))

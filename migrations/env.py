"""Alembic environment for pgstream's own schema (``pgstream``).

Used by :mod:`pgstream.db.migrate` (``pgstream db upgrade``), which builds the Alembic
config in code and passes an open SQLAlchemy connection in
``config.attributes["connection"]``; otherwise the ``sqlalchemy.url`` option is used.

* The version table is ``pgstream.alembic_version``; the schema is created here first unless
  it exists (a pre-created schema needs no CREATE privilege on the database).
* Autogenerate only ever sees the ``pgstream`` schema: user tables elsewhere are ignored.
* Every run holds a transaction-scoped advisory lock, so concurrent upgrades queue up and
  the later ones find the work already done.
* When a downgrade reaches base, the (then empty) ``pgstream`` schema is dropped too.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from pgstream.db.migrate import ADVISORY_LOCK_KEY, VERSION_TABLE, migration_context_options
from pgstream.db.tables import SCHEMA

config = context.config
target_metadata = migration_context_options()["target_metadata"]


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "no database: pass config.attributes['connection'] or set sqlalchemy.url"
        )
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def run_migrations_offline() -> None:
    """Emit the migration SQL instead of running it (``alembic upgrade --sql``)."""
    context.configure(url=_url(), literal_binds=True, **migration_context_options())
    with context.begin_transaction():
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        context.run_migrations()


def _schema_is_empty(connection: Connection) -> bool:
    row = connection.execute(
        text(
            """
            SELECT NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid)
               AND NOT EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = n.oid)
               AND NOT EXISTS (SELECT 1 FROM pg_type t WHERE t.typnamespace = n.oid)
            FROM pg_namespace n WHERE n.nspname = :schema
            """
        ),
        {"schema": SCHEMA},
    ).first()
    return bool(row and row[0])


def _create_schema(connection: Connection) -> None:
    """Create the schema unless it exists. ``CREATE SCHEMA IF NOT EXISTS`` alone would need
    CREATE on the database even when a DBA pre-created the schema for the migration role."""
    exists = connection.execute(
        text("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :schema)"),
        {"schema": SCHEMA},
    ).scalar()
    if not exists:
        connection.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on ``connection`` under the migration advisory lock."""
    context.configure(connection=connection, **migration_context_options())
    with context.begin_transaction():
        # Serialize concurrent runs; held until this transaction ends. The current
        # revision is read after the lock, so a queued run sees the finished work.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        _create_schema(connection)
        context.run_migrations()
        migration_context = context.get_context()
        if not migration_context.get_current_heads():
            # Fully downgraded: remove the version table and the schema if nothing else is left.
            connection.execute(text(f'DROP TABLE IF EXISTS "{SCHEMA}"."{VERSION_TABLE}"'))
            if _schema_is_empty(connection):
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{SCHEMA}"'))


def run_migrations_online() -> None:
    """Run the migrations against a live database."""
    connectable: Any = config.attributes.get("connection")
    if connectable is not None:
        do_run_migrations(connectable)
        return
    engine = create_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            do_run_migrations(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

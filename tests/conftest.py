"""Shared database fixtures.

The session's PostgreSQL server comes from, in order:

1. ``$PGSTREAM_TEST_DSN`` (CI sets it to the local server);
2. a testcontainers PostgreSQL when a Docker engine is reachable;
3. an embedded ``pgserver`` in a temporary directory (stopped and deleted at the end).

Once per session (per xdist worker) a template database ``pgstream_tpl_<pid>_<random>`` is
created and migrated to head with :func:`pgstream.db.migrate.upgrade`. Each test that asks
for ``pg_dsn`` gets a fresh database cloned from it (``CREATE DATABASE ... TEMPLATE``),
dropped with ``WITH (FORCE)`` after the test.

Fixtures:

* ``pg_server_dsn`` (session, str): DSN of the server's maintenance database. Do not create
  pgstream objects in it; use it only to create or drop databases.
* ``pg_dsn`` (str): a fresh, migrated database for this test alone (URL form when the server
  DSN is a URL).
* ``pg_conn``: an autocommit ``psycopg.Connection`` to ``pg_dsn``, closed after the test.
* ``pg_empty_dsn`` (str): a fresh database that is *not* migrated (cloned from template0).
* ``make_database`` (factory): ``make_database(migrated=True) -> str`` for tests that need
  several databases; all are dropped after the test.
* ``procs`` (list): processes the test started (append them, e.g. from
  :func:`proctools.start_cli`); any still running at the end are killed with their group.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proctools import kill_group
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgstream.db.connect import connect, normalize_dsn, with_database

_PID = os.getpid()
_counter = itertools.count(1)
_NAME_RE = re.compile(r"^pgstream_(?:tpl|t)_(\d+)_[0-9a-f]+$")


def _docker_available() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _admin(server_dsn: str) -> psycopg.Connection[Any]:
    return connect(server_dsn, autocommit=True)


def _new_name(kind: str) -> str:
    """A database name unique to this process (xdist workers are separate processes)."""
    return f"pgstream_{kind}_{_PID}_{next(_counter)}{secrets.token_hex(3)}"


def _create_database(server_dsn: str, name: str, template: str) -> None:
    with _admin(server_dsn) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )


def _drop_database(server_dsn: str, name: str) -> None:
    with _admin(server_dsn) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _is_local(server_dsn: str) -> bool:
    host = str(conninfo_to_dict(server_dsn).get("host") or "")
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def _drop_stale_databases(server_dsn: str) -> None:
    """Drop test databases left by killed pytest processes on this machine."""
    if not _is_local(server_dsn):
        return
    with _admin(server_dsn) as conn:
        names = [
            str(row[0])
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'pgstream\\_%'"
            )
        ]
    for name in names:
        match = _NAME_RE.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == _PID:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(psycopg.Error):
                _drop_database(server_dsn, name)
        except OSError:
            pass  # alive but not ours to signal


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of the session's PostgreSQL server (maintenance database)."""
    env = os.environ.get("PGSTREAM_TEST_DSN", "").strip()
    if env:
        yield normalize_dsn(env)
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield normalize_dsn(container.get_connection_url())
        return
    from pgstream.db import embedded

    tmp = Path(tempfile.mkdtemp(prefix="pgstream-test-"))
    pgdata = tmp / "pgdata"
    try:
        yield embedded.start_server(pgdata, cleanup=True)
    finally:
        embedded.stop_server(pgdata)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_server_dsn: str) -> Iterator[str]:
    """Name of this session's template database, migrated to head."""
    from pgstream.db import migrate

    _drop_stale_databases(pg_server_dsn)
    name = _new_name("tpl")
    _create_database(pg_server_dsn, name, "template0")
    try:
        migrate.upgrade(with_database(pg_server_dsn, name))
        yield name
    finally:
        _drop_database(pg_server_dsn, name)


@pytest.fixture
def make_database(pg_server_dsn: str, pg_template: str) -> Iterator[Callable[..., str]]:
    """Factory: ``make_database(migrated=True) -> dsn`` of a new database, dropped afterwards."""
    created: list[str] = []

    def make(migrated: bool = True) -> str:
        name = _new_name("t")
        _create_database(pg_server_dsn, name, pg_template if migrated else "template0")
        created.append(name)
        return with_database(pg_server_dsn, name)

    yield make
    for name in reversed(created):
        _drop_database(pg_server_dsn, name)


@pytest.fixture
def pg_dsn(make_database: Callable[..., str]) -> str:
    """DSN of a fresh database migrated to head, for this test alone."""
    return make_database(migrated=True)


@pytest.fixture
def pg_empty_dsn(make_database: Callable[..., str]) -> str:
    """DSN of a fresh database without the pgstream schema."""
    return make_database(migrated=False)


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to ``pg_dsn``."""
    with connect(pg_dsn, autocommit=True) as conn:
        yield conn


# -- least privilege: a migration role and a runtime role ---------------------------------------


@dataclass
class Roles:
    """Two non-superuser roles on a fresh, unmigrated database (see :func:`pg_roles`).

    ``owner_dsn`` is the superuser's DSN of the database (it creates and owns the app's tables);
    ``migrator`` owns the ``pgstream`` schema and migrated it; ``runtime`` got the grants
    ``pgstream db grant`` prints for the schema, and nothing on the app's tables yet.
    """

    owner_dsn: str
    migrator: str
    runtime: str
    migrator_dsn: str
    runtime_dsn: str

    def grant(self, *statements: str, as_migrator: bool = False) -> None:
        """Run ``statements`` as the owner (or the migrator); ``{rt}`` and ``{mig}`` stand for
        the quoted runtime and migration roles."""
        names = {"rt": sql.Identifier(self.runtime), "mig": sql.Identifier(self.migrator)}
        with connect(self.migrator_dsn if as_migrator else self.owner_dsn, autocommit=True) as c:
            for statement in statements:
                c.execute(sql.SQL(statement).format(**names))


def _role_dsn(dsn: str, role: str, password: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(dsn, user=role, password=password)


_ROLE_RE = re.compile(r"^pgs_(?:mig|rt)_(\d+)_[0-9a-f]+$")


def _drop_stale_roles(server_dsn: str) -> None:
    """Drop test roles left by killed pytest processes (their databases are gone)."""
    if not _is_local(server_dsn):
        return
    with _admin(server_dsn) as conn:
        names = [str(r[0]) for r in conn.execute("SELECT rolname FROM pg_roles")]
        for name in names:
            match = _ROLE_RE.match(name)
            if not match or int(match.group(1)) == _PID:
                continue
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
            except OSError:
                pass


def create_roles(server_dsn: str, dsn: str, *, precreate_schema: bool = True) -> Roles:
    """Create the two roles for database ``dsn``; the migrator runs pgstream's migrations."""
    from pgstream.db import migrate

    _drop_stale_roles(server_dsn)

    tag = f"{_PID}_{secrets.token_hex(3)}"
    migrator, runtime, password = f"pgs_mig_{tag}", f"pgs_rt_{tag}", secrets.token_hex(8)
    dbname = str(conninfo_to_dict(dsn)["dbname"])
    with _admin(server_dsn) as conn:
        for role in (migrator, runtime):
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
    roles = Roles(
        dsn,
        migrator,
        runtime,
        _role_dsn(dsn, migrator, password),
        _role_dsn(dsn, runtime, password),
    )
    with connect(dsn, autocommit=True) as conn:
        if precreate_schema:  # a DBA's way: no CREATE on the database for the migrator
            conn.execute(
                sql.SQL("CREATE SCHEMA pgstream AUTHORIZATION {}").format(sql.Identifier(migrator))
            )
        else:
            conn.execute(
                sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                    sql.Identifier(dbname), sql.Identifier(migrator)
                )
            )
    migrate.upgrade(roles.migrator_dsn)
    return roles


def drop_roles(server_dsn: str, roles: Roles) -> None:
    """End the roles' sessions, drop what they own or were granted, drop them."""
    names = [roles.migrator, roles.runtime]
    with _admin(server_dsn) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
            [names],
        )
    with contextlib.suppress(psycopg.OperationalError), connect(
        roles.owner_dsn, autocommit=True
    ) as conn:
        for name in (roles.runtime, roles.migrator):  # one at a time: a default ACL names both
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
    with _admin(server_dsn) as conn:
        conn.execute(
            sql.SQL("DROP ROLE IF EXISTS {}").format(
                sql.SQL(", ").join(sql.Identifier(n) for n in names)
            )
        )


@pytest.fixture
def pg_roles(pg_server_dsn: str, make_database: Callable[..., str]) -> Iterator[Roles]:
    """A fresh database migrated by a non-superuser migration role that owns the ``pgstream``
    schema (created for it, as a DBA would), and a runtime role with the schema's grants from
    ``pgstream db grant`` (run as the migrator). Roles are cluster-wide: unique names, dropped
    after the test. Grants on the app's tables are the test's business (``roles.grant``)."""
    from pgstream.db.privileges import grant_statements

    roles = create_roles(pg_server_dsn, make_database(migrated=False))
    try:
        script = "\n".join(grant_statements(roles.runtime))
        with connect(roles.migrator_dsn, autocommit=True) as conn:
            conn.execute(script.encode())
        yield roles
    finally:
        drop_roles(pg_server_dsn, roles)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; any still running at the end are killed with their group,
    and the children they leave too."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        kill_group(proc)

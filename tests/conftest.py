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
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
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

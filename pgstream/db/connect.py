"""Choosing the database and connecting to it.

Database selection, in order: ``--dsn``, ``$PGSTREAM_DSN``, ``$DATABASE_URL``, else the
embedded PostgreSQL server (see :mod:`pgstream.db.embedded`). Every DSN is normalized to a
form libpq understands: ``postgresql+psycopg://`` (SQLAlchemy) and ``postgres://`` URLs are
accepted, as are ``key=value`` connection strings.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgstream.errors import DatabaseError

__all__ = [
    "CONNECT_HINT",
    "ENV_VARS",
    "connect",
    "describe_dsn",
    "normalize_dsn",
    "redact_dsn",
    "resolve_dsn",
    "safe_dsn",
    "sqlalchemy_url",
    "with_database",
]

#: Environment variables consulted (in this order) when no ``--dsn`` is given.
ENV_VARS = ("PGSTREAM_DSN", "DATABASE_URL")

CONNECT_HINT = "is the server running? check --dsn / PGSTREAM_DSN"

# ``scheme://`` prefixes, with or without a SQLAlchemy ``+driver`` suffix.
_URL_SCHEME = re.compile(r"^(postgres|postgresql)(\+[A-Za-z0-9_]+)?://", re.IGNORECASE)
_DEFAULT_CONNECT_TIMEOUT = 10


def normalize_dsn(dsn: str) -> str:
    """Return ``dsn`` as a libpq DSN (``postgresql://...`` URL or ``key=value`` string).

    ``postgresql+psycopg://``, ``postgresql+psycopg2://`` and ``postgres://`` URLs become
    ``postgresql://`` URLs; anything else is returned stripped but otherwise unchanged.
    """
    dsn = dsn.strip()
    match = _URL_SCHEME.match(dsn)
    if match:
        return "postgresql://" + dsn[match.end() :]
    return dsn


def resolve_dsn(cli_dsn: str | None) -> str:
    """Pick the database: ``--dsn``, then ``$PGSTREAM_DSN``, ``$DATABASE_URL``, else embedded.

    Empty values count as unset. The embedded server is started (or reused) only when
    nothing else is configured.
    """
    if cli_dsn and cli_dsn.strip():
        return normalize_dsn(cli_dsn)
    for var in ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return normalize_dsn(value)
    from pgstream.db import embedded

    return embedded.ensure_server()


def _params(dsn: str) -> dict[str, Any]:
    """Parse a DSN into libpq parameters (raises :class:`DatabaseError` if it is malformed)."""
    try:
        return conninfo_to_dict(normalize_dsn(dsn))
    except psycopg.ProgrammingError:
        raise DatabaseError(
            f"invalid database DSN {redact_dsn(dsn)!r}",
            hint="use postgresql://USER@HOST:PORT/DBNAME or 'host=... dbname=...'",
        ) from None


def describe_dsn(dsn: str) -> str:
    """A short human description of where ``dsn`` points, never including the password.

    For example ``database "test" at 127.0.0.1:5432 as user "root"``.
    """
    params = _params(dsn)
    host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    user = str(params.get("user") or os.environ.get("PGUSER") or "")
    dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or user or "")
    if not host:
        where = "the local socket"
    elif host.startswith("/"):
        where = f"socket {host}"
    else:
        where = f"{host}:{port}"
    text = f'database "{dbname}" at {where}' if dbname else f"the server at {where}"
    if user:
        text += f' as user "{user}"'
    return text


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***`` (for messages and logs)."""
    # URL form: scheme://user:password@host
    dsn = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1:***@", dsn)
    # key=value form and URL query parameters
    dsn = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", r"\1***", dsn, flags=re.I)
    return dsn


def safe_dsn(dsn: str) -> str:
    """A ``postgresql://`` URL for ``dsn`` without its password (to print in commands to run)."""
    params = _params(dsn)
    params.pop("password", None)
    host = str(params.pop("host", "") or "")
    port = str(params.pop("port", "") or "")
    user = str(params.pop("user", "") or "")
    dbname = str(params.pop("dbname", "") or "")
    query: dict[str, str] = {k: str(v) for k, v in params.items() if v is not None}
    netloc = ""
    if user:
        netloc += quote(user, safe="") + "@"
    if host and not host.startswith("/") and "," not in host:
        netloc += f"[{host}]" if ":" in host else host
        if port:
            netloc += f":{port}"
    else:
        if host:
            query["host"] = host
        if port:
            query["port"] = port
    url = f"postgresql://{netloc}/{quote(dbname, safe='')}"
    if query:
        url += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in sorted(query.items()))
    return url


def with_database(dsn: str, dbname: str) -> str:
    """Return ``dsn`` pointed at database ``dbname`` (same form: URL stays URL)."""
    _params(dsn)  # validate first for a clear error
    normalized = normalize_dsn(dsn)
    if not normalized.lower().startswith("postgresql://"):
        return make_conninfo(normalized, dbname=dbname)
    parts = urlsplit(normalized)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return urlunsplit(
        (parts.scheme, parts.netloc, "/" + quote(dbname, safe=""), urlencode(query, safe="/"), "")
    )


def sqlalchemy_url(dsn: str) -> str:
    """Return a SQLAlchemy URL (``postgresql+psycopg://...``) for ``dsn``.

    ``key=value`` DSNs are turned into URL query parameters, which the psycopg dialect
    passes on to libpq unchanged.
    """
    normalized = normalize_dsn(dsn)
    if normalized.lower().startswith("postgresql://"):
        return "postgresql+psycopg://" + normalized[len("postgresql://") :]
    params = _params(normalized)
    query = "&".join(
        f"{quote(str(k), safe='')}={quote(str(v), safe='/')}"
        for k, v in params.items()
        if v is not None
    )
    return "postgresql+psycopg:///" + (f"?{query}" if query else "")


def _reason(exc: BaseException) -> str:
    """The useful part of a libpq connection error, as one line."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    # 'connection failed: connection to server at "h", port 1 failed: Connection refused'
    if "failed:" in first:
        first = first.rsplit("failed:", 1)[1].strip()
    first = re.sub(r"^(FATAL|ERROR):\s+", "", first)
    first = re.sub(r"\s+", " ", first)
    return first[:1].lower() + first[1:] if first else first


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a psycopg connection to ``dsn``.

    Connection failures become a :class:`DatabaseError` with one line naming the host and
    database (never the password) and a hint. Keyword arguments go to
    :func:`psycopg.connect` (``autocommit=True``, ``row_factory=...``, libpq parameters).
    A ``connect_timeout`` of 10 seconds applies unless the DSN or ``kwargs`` set one.
    """
    params = _params(dsn)
    if "connect_timeout" not in params and "connect_timeout" not in kwargs:
        kwargs["connect_timeout"] = _DEFAULT_CONNECT_TIMEOUT
    try:
        return psycopg.connect(normalize_dsn(dsn), **kwargs)
    except psycopg.OperationalError as exc:
        reason = _reason(exc)
        hint = CONNECT_HINT
        if reason.startswith("database") and "does not exist" in reason:
            hint = "create the database first, or check --dsn / PGSTREAM_DSN"
        elif reason.startswith("role") or "authentication" in reason or "password" in reason:
            hint = "check the user and password in --dsn / PGSTREAM_DSN"
        raise DatabaseError(f"cannot connect to {describe_dsn(dsn)}: {reason}", hint=hint) from exc

"""Database selection, DSN normalization and connection errors (no server needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pgstream.db import connect as db_connect
from pgstream.db import embedded
from pgstream.db.connect import (
    connect,
    describe_dsn,
    normalize_dsn,
    redact_dsn,
    resolve_dsn,
    safe_dsn,
    sqlalchemy_url,
    with_database,
)
from pgstream.errors import DatabaseError

EMBEDDED = "postgresql://postgres:@/postgres?host=/tmp/embedded-sentinel"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGSTREAM_DSN", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(embedded, "ensure_server", lambda: EMBEDDED)


def test_cli_dsn_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSTREAM_DSN", "postgresql://env@h/pgstream")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@h/database_url")
    assert resolve_dsn("postgresql://cli@h/db") == "postgresql://cli@h/db"


def test_pgstream_dsn_before_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSTREAM_DSN", "postgresql://env@h/pgstream")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@h/database_url")
    assert resolve_dsn(None) == "postgresql://env@h/pgstream"


def test_database_url_when_no_pgstream_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u@h:5433/app")
    assert resolve_dsn(None) == "postgresql://u@h:5433/app"


def test_embedded_when_nothing_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSTREAM_DSN", "  ")  # empty values count as unset
    assert resolve_dsn(None) == EMBEDDED
    assert resolve_dsn("") == EMBEDDED


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql+psycopg://u:p@h:5432/db", "postgresql://u:p@h:5432/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql://u@h/db"),
        ("postgres://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("POSTGRES://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("  host=h dbname=db user=u ", "host=h dbname=db user=u"),
    ],
)
def test_normalize_dsn(given: str, expected: str) -> None:
    assert normalize_dsn(given) == expected
    assert resolve_dsn(given) == expected


def test_sqlalchemy_url_forms() -> None:
    assert sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert sqlalchemy_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    url = sqlalchemy_url("host=/tmp/sock dbname=db user=u")
    assert url.startswith("postgresql+psycopg:///?")
    assert "host=/tmp/sock" in url and "dbname=db" in url and "user=u" in url


def test_with_database_keeps_the_form() -> None:
    assert with_database("postgres://u:p@h:1/a?sslmode=disable", "b") == (
        "postgresql://u:p@h:1/b?sslmode=disable"
    )
    assert with_database(EMBEDDED, "t1") == (
        "postgresql://postgres:@/t1?host=/tmp/embedded-sentinel"
    )
    kv = with_database("host=h dbname=a user=u", "b")
    assert "dbname=b" in kv and "host=h" in kv


def test_messages_never_show_the_password() -> None:
    dsn = "postgresql://alice:s3cret@db.example:6543/shop"
    assert "s3cret" not in describe_dsn(dsn)
    assert describe_dsn(dsn) == 'database "shop" at db.example:6543 as user "alice"'
    assert "s3cret" not in redact_dsn(dsn)
    assert "s3cret" not in redact_dsn("host=h password=s3cret dbname=x")
    assert "s3cret" not in safe_dsn(dsn)
    assert safe_dsn(dsn) == "postgresql://alice@db.example:6543/shop"


def test_describe_socket_dsn() -> None:
    assert describe_dsn(EMBEDDED) == (
        'database "postgres" at socket /tmp/embedded-sentinel as user "postgres"'
    )


def test_connect_failure_is_one_clear_line_without_password() -> None:
    with pytest.raises(DatabaseError) as info:
        connect("postgresql://alice:s3cret@127.0.0.1:1/shop", connect_timeout=3)
    err = info.value
    assert "s3cret" not in str(err)
    assert "\n" not in err.message
    assert 'database "shop"' in err.message and "127.0.0.1:1" in err.message
    assert err.hint is not None and "PGSTREAM_DSN" in err.hint


def test_invalid_dsn_is_a_database_error() -> None:
    with pytest.raises(DatabaseError, match="invalid database DSN"):
        connect("this is not a dsn")


def test_missing_embedded_extra_explains_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.undo()  # use the real ensure_server
    for var in ("PGSTREAM_DSN", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "pgserver", None)  # makes `import pgserver` fail
    monkeypatch.setattr(embedded, "_servers", {})
    with pytest.raises(DatabaseError) as info:
        db_connect.resolve_dsn(None)
    assert "pgstream-engine[embedded]" in str(info.value)


def test_embedded_data_dir_honours_pgstream_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGSTREAM_HOME", str(tmp_path))
    assert embedded.data_dir() == tmp_path / "pgdata"

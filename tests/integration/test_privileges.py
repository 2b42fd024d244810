"""Least privilege (issue 11 item 13): pgstream as a non-superuser migration role and runtime
role, with exactly the grants README "Permissions" lists, and one clear error naming every
missing grant and the GRANT that fixes it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proctools import cli_env, run_cli

from pgstream.db.connect import connect

APP = """
import pgstream as ps

app = ps.App("shop", batch_size=50)
orders = app.stream("orders", ps.TableSource("public.orders", offset_column="id"))
orders.map(lambda o: {"order_id": o["id"], "cents": o["amount"] * 100}).to_table("order_facts")
orders.key_by("user_id").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("user_totals")
orders.key_by("user_id").fold(0, lambda s, o: s + 1).to_table("user_folds")
"""

DDL = """
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id integer NOT NULL,
                     amount integer NOT NULL);
CREATE TABLE order_facts (order_id bigint NOT NULL, cents bigint NOT NULL,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL DEFAULT 0, UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE user_totals (user_id integer PRIMARY KEY, n bigint NOT NULL, total bigint);
CREATE TABLE user_folds (user_id integer PRIMARY KEY, value bigint);
INSERT INTO orders (user_id, amount) SELECT g % 7, g % 40 FROM generate_series(1, 300) g;
"""

#: What README "Permissions" tells the owner of the app's tables to grant the runtime role.
APP_GRANTS = (
    "GRANT SELECT ON public.orders TO {rt}",
    "GRANT SELECT, INSERT ON public.order_facts TO {rt}",
    "GRANT SELECT, INSERT, UPDATE ON public.user_totals, public.user_folds TO {rt}",
)


def pgstream(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env=cli_env(PYTHONPATH=str(cwd)))


def setup_app(tmp_path: Path, roles: Any, *, grant: bool = True) -> None:
    (tmp_path / "shopapp.py").write_text(APP)
    with connect(roles.owner_dsn, autocommit=True) as conn:
        conn.execute(DDL)
    if grant:
        roles.grant(*APP_GRANTS)


def run(roles: Any, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return pgstream(
        "run", "shopapp:app", "--dsn", roles.runtime_dsn, "--stop-when-idle", cwd=tmp_path
    )


def counts(roles: Any) -> tuple[int, int, int]:
    with connect(roles.owner_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM order_facts), "
            "(SELECT coalesce(sum(n), 0) FROM user_totals), "
            "(SELECT coalesce(sum(value), 0) FROM user_folds)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith(("error:", "  hint:"))]


# -- the roles and the documented grants are enough -----------------------------------------


def test_roles_are_not_superusers(pg_roles: Any) -> None:
    for dsn in (pg_roles.migrator_dsn, pg_roles.runtime_dsn):
        with connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles "
                "WHERE rolname = current_user"
            ).fetchone()
        assert row == (False, False, False, False)
    with connect(pg_roles.owner_dsn, autocommit=True) as conn:
        owner = conn.execute(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgstream'"
        ).fetchone()
    assert owner == (pg_roles.migrator,)


def test_cli_as_runtime_role(pg_roles: Any, tmp_path: Path) -> None:
    """run --stop-when-idle, status and verify as the runtime role, with the documented grants."""
    setup_app(tmp_path, pg_roles)
    done = run(pg_roles, tmp_path)
    assert done.returncode == 0, done.stderr
    assert counts(pg_roles) == (300, 300, 300)

    status = pgstream("status", "--dsn", pg_roles.runtime_dsn, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert (row["job"], row["committed_offset"], row["lag"]) == ("shop", 301, 0)
    live = pgstream("status", "shopapp:app", "--dsn", pg_roles.runtime_dsn, cwd=tmp_path)
    assert live.returncode == 0 and "shop" in live.stdout, live.stderr

    verify = pgstream("verify", "shopapp:app", "--dsn", pg_roles.runtime_dsn, cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "clean" in verify.stdout

    # more rows later: the second run resumes from the committed offset
    with connect(pg_roles.owner_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO orders (user_id, amount) SELECT g, 5 FROM generate_series(1, 20) g"
        )
    assert run(pg_roles, tmp_path).returncode == 0
    assert counts(pg_roles) == (320, 320, 320)


def test_db_grant_prints_the_grants(pg_roles: Any, tmp_path: Path) -> None:
    setup_app(tmp_path, pg_roles, grant=False)
    rt = pg_roles.runtime
    schema_only = pgstream("db", "grant", rt, cwd=tmp_path)
    assert schema_only.returncode == 0, schema_only.stderr
    assert f"GRANT USAGE ON SCHEMA pgstream TO {rt};" in schema_only.stdout.splitlines()
    full = pgstream(
        "db", "grant", rt, "--app", "shopapp:app", "--dsn", pg_roles.runtime_dsn, cwd=tmp_path
    )
    assert full.returncode == 0, full.stderr
    lines = full.stdout.splitlines()
    assert lines[: len(schema_only.stdout.splitlines())] == schema_only.stdout.splitlines()
    assert f"GRANT SELECT ON public.orders TO {rt};  -- source of 'orders'" in lines
    assert any(line.startswith(f"GRANT SELECT, INSERT ON order_facts TO {rt};") for line in lines)
    assert any(
        line.startswith(f"GRANT SELECT, INSERT, UPDATE ON user_totals TO {rt};") for line in lines
    )
    assert any(
        line.startswith(f"GRANT SELECT ON SEQUENCE public.orders_id_seq TO {rt};") for line in lines
    )
    # the printed app part, run by the tables' owner, is enough to run the app
    start = next(i for i, line in enumerate(lines) if line.startswith("-- as the owner of the t"))
    with connect(pg_roles.owner_dsn, autocommit=True) as conn:
        conn.execute("\n".join(lines[start:]).encode())
    done = run(pg_roles, tmp_path)
    assert done.returncode == 0, done.stderr
    assert counts(pg_roles) == (300, 300, 300)


def test_default_privileges_cover_later_migrations(pg_roles: Any) -> None:
    """A table a later migration adds (created by the migration role) is granted at once;
    one created by someone else is named by the start check."""
    from pgstream.db.privileges import missing_privileges

    with connect(pg_roles.migrator_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE pgstream.future (id bigserial PRIMARY KEY)")
    with connect(pg_roles.owner_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE pgstream.stray (id int)")
    with connect(pg_roles.runtime_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pgstream.future DEFAULT VALUES")
        role, missing = missing_privileges(conn, [])
    assert role == pg_roles.runtime
    assert {(m.name, m.privilege) for m in missing} == {
        ("stray", p) for p in ("SELECT", "INSERT", "UPDATE", "DELETE")
    }


# -- a missing grant is one clear error naming it -------------------------------------------


def refused_run(roles: Any, tmp_path: Path, revoke: str, *, as_migrator: bool = False) -> list[str]:
    """The app run after ``revoke``: exit 1; its error and hint lines."""
    setup_app(tmp_path, roles)
    roles.grant(revoke, as_migrator=as_migrator)
    done = run(roles, tmp_path)
    assert done.returncode == 1
    return error_lines(done)


def test_missing_source_select(pg_roles: Any, tmp_path: Path) -> None:
    lines = refused_run(pg_roles, tmp_path, "REVOKE SELECT ON public.orders FROM {rt}")
    rt = pg_roles.runtime
    assert lines[0] == (
        f"error: permission denied: role {rt} cannot SELECT from table public.orders "
        f"(source of stream 'orders'); fix: GRANT SELECT ON public.orders TO {rt}"
    )
    assert counts(pg_roles) == (0, 0, 0)


def test_missing_sink_insert(pg_roles: Any, tmp_path: Path) -> None:
    lines = refused_run(pg_roles, tmp_path, "REVOKE INSERT ON public.order_facts FROM {rt}")
    rt = pg_roles.runtime
    assert lines[0] == (
        f"error: permission denied: role {rt} cannot INSERT into table public.order_facts "
        f"(append sink); fix: GRANT INSERT ON public.order_facts TO {rt}"
    )
    assert lines[1].startswith("  hint: run the GRANTs as the objects' owner")
    assert counts(pg_roles) == (0, 0, 0)


def test_missing_upsert_sink_privileges(pg_roles: Any, tmp_path: Path) -> None:
    revoke = "REVOKE SELECT, UPDATE ON public.user_totals FROM {rt}"
    lines = refused_run(pg_roles, tmp_path, revoke)
    rt = pg_roles.runtime
    assert lines[0] == (
        f"error: permission denied: role {rt} lacks SELECT, UPDATE on table public.user_totals "
        f"(upsert sink); fix: GRANT SELECT, UPDATE ON public.user_totals TO {rt}"
    )


def test_missing_pgstream_schema_usage(pg_roles: Any, tmp_path: Path) -> None:
    revoke = "REVOKE USAGE ON SCHEMA pgstream FROM {rt}"
    lines = refused_run(pg_roles, tmp_path, revoke, as_migrator=True)
    rt = pg_roles.runtime
    assert lines[0] == (
        f"error: permission denied: role {rt} cannot use schema pgstream "
        f"(pgstream's checkpoint tables); fix: GRANT USAGE ON SCHEMA pgstream TO {rt}"
    )
    assert "the role that ran `pgstream db upgrade`" in lines[1]


def test_all_missing_grants_in_one_error(pg_roles: Any, tmp_path: Path) -> None:
    setup_app(tmp_path, pg_roles, grant=False)
    pg_roles.grant(
        "REVOKE ALL ON ALL TABLES IN SCHEMA pgstream FROM {rt}",
        "REVOKE USAGE ON SCHEMA pgstream FROM {rt}",
        as_migrator=True,
    )
    done = run(pg_roles, tmp_path)
    assert done.returncode == 1
    (error, hint) = error_lines(done)
    rt = pg_roles.runtime
    assert error.startswith(f"error: permission denied: role {rt} lacks 6 grants: ")
    for part in (
        "cannot use schema pgstream",
        "cannot SELECT from table public.orders (source of stream 'orders')",
        "cannot INSERT into table public.order_facts (append sink)",
        "lacks SELECT, INSERT, UPDATE on table public.user_totals (upsert sink)",
        "lacks SELECT, INSERT, UPDATE on table public.user_folds (upsert sink)",
        "lacks DML on pgstream's checkpoint tables (pgstream.alembic_version, pgstream.batches",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgstream TO {rt}",
        f"REVOKE INSERT, UPDATE, DELETE ON pgstream.alembic_version FROM {rt}",
    ):
        assert part in error, part
    assert hint.startswith("  hint: ")


def test_denied_elsewhere_is_one_clear_error(pg_roles: Any, tmp_path: Path) -> None:
    """The CLI's fallback for SQLSTATE 42501 outside the start check (status, verify)."""
    setup_app(tmp_path, pg_roles)
    assert run(pg_roles, tmp_path).returncode == 0
    pg_roles.grant("REVOKE USAGE ON SCHEMA pgstream FROM {rt}", as_migrator=True)
    status = pgstream("status", "--dsn", pg_roles.runtime_dsn, cwd=tmp_path)
    assert status.returncode == 1
    assert error_lines(status) == [
        "error: permission denied for schema pgstream (SQLSTATE 42501: the role pgstream "
        "connects as lacks a grant)",
        "  hint: fix: GRANT USAGE ON SCHEMA pgstream TO <role>; `pgstream db grant <role> "
        "--app MODULE:APP` prints every grant pgstream needs",
    ]
    pg_roles.grant("GRANT USAGE ON SCHEMA pgstream TO {rt}", as_migrator=True)
    pg_roles.grant("REVOKE SELECT ON public.order_facts FROM {rt}")
    verify = pgstream("verify", "shopapp:app", "--dsn", pg_roles.runtime_dsn, cwd=tmp_path)
    assert verify.returncode != 0
    assert "permission denied for table order_facts" in verify.stderr, verify.stderr
    assert "Traceback" not in verify.stderr


# -- the migration role ------------------------------------------------------------------------


def test_migrator_without_create_on_database(
    pg_server_dsn: str, make_database: Any, tmp_path: Path
) -> None:
    """With neither CREATE on the database nor a pre-created schema, `db upgrade` says which
    grant is missing; a pre-created schema is enough (covered by the pg_roles fixture)."""
    import secrets

    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    dsn = make_database(migrated=False)
    role = f"pgs_mig_{os.getpid()}_{secrets.token_hex(3)}"
    with connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x'").format(sql.Identifier(role)))
    try:
        done = pgstream(
            "db", "upgrade", "--dsn", make_conninfo(dsn, user=role, password="x"), cwd=tmp_path
        )
        assert done.returncode == 1
        error, hint = error_lines(done)
        assert error.startswith("error: permission denied for database ")
        assert "GRANT CREATE ON DATABASE" in hint and "CREATE SCHEMA pgstream AUTHORIZATION" in hint
    finally:
        with connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("precreate", [True, False])
def test_migrator_upgrades_and_downgrades(
    pg_server_dsn: str, make_database: Any, precreate: bool
) -> None:
    """The migration role migrates with a pre-created schema or with CREATE on the database,
    and downgrades and upgrades again; the roles are gone afterwards."""
    from conftest import create_roles, drop_roles

    from pgstream.db import migrate

    roles = create_roles(pg_server_dsn, make_database(migrated=False), precreate_schema=precreate)
    try:
        assert migrate.current(roles.migrator_dsn) == migrate.head()
        migrate.downgrade(roles.migrator_dsn, "0001_initial")
        assert migrate.current(roles.migrator_dsn) == "0001_initial"
        migrate.upgrade(roles.migrator_dsn)
        assert migrate.current(roles.migrator_dsn) == migrate.head()
    finally:
        drop_roles(pg_server_dsn, roles)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(roles.runtime_dsn).close()

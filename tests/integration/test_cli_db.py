"""``pgstream db upgrade | current | downgrade`` against a real database."""

from __future__ import annotations

from click.testing import CliRunner

from pgstream.cli import main
from pgstream.db import migrate


def test_db_commands_round_trip(pg_empty_dsn: str) -> None:
    runner = CliRunner()
    head = migrate.head()

    result = runner.invoke(main, ["db", "current", "--dsn", pg_empty_dsn])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("none")

    result = runner.invoke(main, ["db", "upgrade", "--dsn", pg_empty_dsn])
    assert result.exit_code == 0, result.output
    assert f"-> {head}" in result.output
    assert migrate.current(pg_empty_dsn) == head

    result = runner.invoke(main, ["db", "upgrade", "--dsn", pg_empty_dsn])
    assert result.exit_code == 0, result.output
    assert "already at revision" in result.output

    result = runner.invoke(main, ["db", "current", "--dsn", pg_empty_dsn])
    assert result.output.strip() == f"{head} (head)"

    result = runner.invoke(main, ["db", "downgrade", "base", "--dsn", pg_empty_dsn])
    assert result.exit_code == 0, result.output
    assert migrate.current(pg_empty_dsn) is None


def test_db_upgrade_uses_pgstream_dsn_env(pg_empty_dsn: str) -> None:
    result = CliRunner().invoke(main, ["db", "upgrade"], env={"PGSTREAM_DSN": pg_empty_dsn})
    assert result.exit_code == 0, result.output
    assert migrate.current(pg_empty_dsn) == migrate.head()

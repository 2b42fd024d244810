"""The CLI reports failures as one ``error:`` line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from pgstream.cli import dsn_option, main
from pgstream.errors import ConfigError

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/x"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PGSTREAM_DSN", "DATABASE_URL"):
        env.pop(var, None)
    return env


@pytest.mark.parametrize(
    "args",
    [
        ["db", "upgrade", "--dsn", UNREACHABLE],
        ["db", "current", "--dsn", UNREACHABLE],
        ["db", "downgrade", "base", "--dsn", UNREACHABLE],
    ],
)
def test_unreachable_database_is_one_error_line(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgstream", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and lines[0].startswith("error:")
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "127.0.0.1:1" in lines[0] and '"x"' in lines[0]
    assert all(line.startswith("  hint:") for line in lines[1:])


def test_pgstream_error_exit_code_and_hint() -> None:
    @main.command("explode-for-test", hidden=True)
    @dsn_option
    def explode(dsn: str | None) -> None:
        raise ConfigError("bad app", hint="try MODULE:APP")

    try:
        result = CliRunner().invoke(main, ["explode-for-test", "--dsn", "x"])
    finally:
        main.commands.pop("explode-for-test", None)
    assert result.exit_code == ConfigError.exit_code
    assert result.output.splitlines() == ["error: bad app", "  hint: try MODULE:APP"]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_dsn_option_is_shared() -> None:
    @click.command()
    @dsn_option
    def cmd(dsn: str | None) -> None:
        click.echo(f"dsn={dsn}")

    assert CliRunner().invoke(cmd, ["--dsn", "postgresql://a@b/c"]).output == (
        "dsn=postgresql://a@b/c\n"
    )
    assert CliRunner().invoke(cmd, []).output == "dsn=None\n"


def test_help_lists_db_commands() -> None:
    result = CliRunner().invoke(main, ["db", "--help"])
    assert result.exit_code == 0
    for name in ("upgrade", "downgrade", "current"):
        assert name in result.output

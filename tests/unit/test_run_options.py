"""``pgstream run`` helpers without a database: password masking and the workers' argv."""

from __future__ import annotations

import sys

import pytest

from pgstream.commands.run import _child_args, command
from pgstream.runtime.argv import mask_password
from pgstream.runtime.supervisor import how_it_ended


@pytest.mark.parametrize(
    ("arg", "want"),
    [
        (b"postgresql://root:s3cret@127.0.0.1:5432/db", b"postgresql://root:******@127.0.0.1:5432/db"),
        (b"--dsn=postgres://u:p%40ss@h/d", b"--dsn=postgres://u:******@h/d"),
        (b"host=h password=abc dbname=d", b"host=h password=*** dbname=d"),
        (b"host=h password='a b' dbname=d", b"host=h password=***** dbname=d"),
        (b"postgresql://h/d?password=zz&sslmode=require", b"postgresql://h/d?password=**&sslmode=require"),
        (b"postgresql://root@127.0.0.1:5432/db", b"postgresql://root@127.0.0.1:5432/db"),
        (b"app:app", b"app:app"),
    ],
)
def test_mask_password_keeps_the_length_and_hides_the_secret(arg: bytes, want: bytes) -> None:
    assert mask_password(arg) == want
    assert len(mask_password(arg)) == len(arg)


def test_child_args_forward_every_option_but_the_dsn_and_workers() -> None:
    ctx = command.make_context(
        "run",
        ["app:app", "--dsn", "postgresql://u:pw@h/d", "--workers", "3", "--stop-when-idle",
         "--batch-size", "50", "-vv", "--progress-interval", "2"],
    )
    args = _child_args(ctx)
    assert args[:5] == [sys.executable, "-m", "pgstream", "run", "app:app"]
    rest = args[5:]
    assert "--dsn" not in rest and "--workers" not in rest
    assert not any("pw" in a for a in args)
    assert rest == ["--stop-when-idle", "--batch-size", "50", "--verbose", "--verbose",
                    "--progress-interval", "2.0"]
    plain = _child_args(command.make_context("run", ["app:app", "--workers", "2"]))
    assert plain[5:] == []


def test_how_it_ended() -> None:
    assert how_it_ended(-9) == "was killed by SIGKILL"
    assert how_it_ended(1) == "exited with code 1"

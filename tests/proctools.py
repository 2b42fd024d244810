"""Helpers shared by tests that run real processes: the ``pgstream`` command line as a user
runs it, waiting, and finding or killing a process's children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_quietly(pid: int) -> None:
    """SIGKILL ``pid`` unless it is gone already."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` with its process group if it still runs, then any child it left."""
    kids = children_of(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for kid in kids:
        kill_quietly(kid)


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without pgstream's settings (``PGSTREAM_*``: the command
    line gets its database from ``--dsn``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m pgstream ARGS`` in ``cwd`` until it exits, its output captured as text;
    ``env`` is its whole environment (default: this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "pgstream", *args],
        cwd=cwd,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    *args: str, cwd: Path, env: Mapping[str, str], stdout: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``python -m pgstream ARGS`` started in ``cwd`` in a new session (so that
    :func:`kill_group` reaches its workers), stderr piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "pgstream", *args],
        cwd=cwd,
        env=dict(env),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

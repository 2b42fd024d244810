"""Running pgstream workers as child processes and reading their peak RSS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class ChildResult:
    """What a worker process reported, its exit status and its peak RSS in MiB (VmHWM)."""

    report: dict[str, Any]
    returncode: int
    peak_rss_mb: float
    stderr: str
    cpu_seconds: float = 0.0  # user + system CPU time of the process (rusage)


def child_args(
    dsn: str,
    workload: str,
    source: str,
    path: Path | str,
    job: str,
    *,
    batch_size: int | None = None,
    forever: bool = False,
    read_log: Path | None = None,
    gate: Path | None = None,
) -> list[str]:
    """The command line of a ``benchmarks.child`` worker."""
    args = [
        sys.executable, "-m", "benchmarks.child", "--dsn", dsn, "--workload", workload,
        "--source", source, "--path", str(path), "--job", job,
    ]  # fmt: skip
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    if forever:
        args.append("--forever")
    if read_log is not None:
        args += ["--read-log", str(read_log)]
    if gate is not None:
        args += ["--gate", str(gate)]
    return args


class Child:
    """A running child process whose output goes to temporary files."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        )
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=full_env, stdout=self._out, stderr=self._err
        )
        self.pid = self.proc.pid

    def running(self) -> bool:
        """True while the process has not exited (does not reap it)."""
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return res is None

    def finish(self) -> ChildResult:
        """Wait for the process and collect its report and peak RSS."""
        _, status, usage = os.wait4(self.pid, 0)
        self.proc.returncode = code = os.waitstatus_to_exitcode(status)
        self._out.seek(0)
        self._err.seek(0)
        out = self._out.read().decode(errors="replace")
        err = self._err.read().decode(errors="replace")
        self._out.close()
        self._err.close()
        report: dict[str, Any] = {}
        for line in out.splitlines():
            if line.startswith("{"):
                report = json.loads(line)
        # The child's own VmHWM when it reported one; ru_maxrss includes the parent's peak
        # (Linux carries it over execve), so it is only an upper bound.
        peak = report.get("peak_rss_mb") or usage.ru_maxrss / 1024
        return ChildResult(report, code, peak, err, usage.ru_utime + usage.ru_stime)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        os.kill(self.pid, sig)

    def kill9(self) -> None:
        """SIGKILL the process (no cleanup of any kind runs in it)."""
        self.signal(signal.SIGKILL)


def run_child(args: list[str]) -> ChildResult:
    """Run a child to completion."""
    return Child(args).finish()

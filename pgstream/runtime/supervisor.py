"""``pgstream run --workers N``: start N worker processes and keep them running.

* The children are ``python -m pgstream run MODULE:APP ...`` without ``--dsn``: the resolved
  DSN travels in their environment (:data:`~pgstream.runtime.argv.DSN_ENV`), never on a
  command line. Each child knows its label (``worker 2/3``) from :data:`LABEL_ENV` and puts
  it in its log lines.
* A child that dies (a signal, or an exit the group did not ask for) is restarted after a
  capped exponential back-off, with one log line saying which worker died and how. A child
  that exits 0 under ``--stop-when-idle`` is done. A child that fails with a usage or
  configuration error (exit 2), or dies right after its start :data:`MAX_QUICK_DEATHS` times
  in a row, stops the whole group with a clear line and a non-zero exit code.
* The first SIGTERM/SIGINT is passed on to every child (as
  :data:`~pgstream.runtime.stopping.SOFT_STOP`: each stops after its batch in flight) and the
  group exits 0 once they all stopped cleanly; a second one is passed on too (as ``HARD_STOP``:
  the children exit at once, their batches roll back) and the group exits ``128 + signum``.
* The children run in their own session (process group), so a Ctrl-C in the terminal reaches them
  once, through the supervisor; they ask the kernel for a SIGTERM should the supervisor die.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from pgstream.runtime.argv import DSN_ENV
from pgstream.runtime.stopping import HARD_STOP, SOFT_STOP

__all__ = [
    "LABEL_ENV",
    "MAX_QUICK_DEATHS",
    "PARENT_ENV",
    "Supervisor",
    "die_with_parent",
    "how_it_ended",
]

log = logging.getLogger("pgstream.supervisor")

#: environment variable carrying a child's label, e.g. ``2/3``
LABEL_ENV = "PGSTREAM_WORKER"
#: environment variable carrying the supervisor's pid (the child stops if it goes away)
PARENT_ENV = "PGSTREAM_SUPERVISOR_PID"
#: a child that dies within this many seconds of its start died "right after start"
QUICK_DEATH_SECONDS = 10.0
#: this many quick deaths in a row of one worker stop the group
MAX_QUICK_DEATHS = 5
#: restart delays: ``FIRST_DELAY`` after a death, doubling with each quick death in a row
#: (1, 2, 4, 8 s), at most ``MAX_DELAY``
FIRST_DELAY = 1.0
MAX_DELAY = 30.0
#: exit code of a usage or configuration error (:class:`~pgstream.errors.ConfigError`, click)
CONFIG_EXIT = 2
#: seconds to wait for children after the second signal before killing them
HARD_STOP_GRACE = 5.0


def how_it_ended(returncode: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``, from a ``Popen.returncode``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass(slots=True)
class _Slot:
    """One of the N workers: its current process and its recent deaths."""

    number: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None  # when to start it again after a death
    done: bool = False  # exited 0 under --stop-when-idle


class GroupStopped(Exception):
    """The group gives up: ``code`` is the supervisor's exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Supervisor:
    """Runs ``workers`` copies of ``child_args`` and restarts the ones that die."""

    def __init__(
        self,
        child_args: list[str],
        dsn: str,
        workers: int,
        *,
        stop_when_idle: bool,
        env: dict[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.child_args = child_args
        self.dsn = dsn
        #: more environment for the children (e.g. where to write their metrics)
        self.env = env or {}
        #: told the pid of each child that ended (e.g. to drop its live metrics)
        self.on_exit = on_exit
        self.slots = [_Slot(i + 1) for i in range(workers)]
        self.stop_when_idle = stop_when_idle
        self._signals: list[int] = []  # stop requests (signals received), in order
        self._forwarded = 0  # how many of them were passed on to the children
        self._unclean = False  # a child ended badly while the group was stopping
        self._wake = threading.Event()

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until every worker is done or stopped; return the exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for slot in self.slots:
                self._start(slot)
            try:
                return self._supervise()
            except GroupStopped as stopped:
                # stop the others like a first signal would (a real one then stops at once)
                self._signals.insert(self._forwarded, SOFT_STOP)
                return self._supervise() or stopped.code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        """Until every worker is done (0) or stopped: 0 if they all stopped cleanly, else 1;
        ``128 + signum`` after a second stop signal."""
        while True:
            while self._forwarded < len(self._signals):
                signum = self._signals[self._forwarded]
                self._forwarded += 1
                if self._forwarded == 1:
                    self._stop_all(SOFT_STOP)
                else:
                    return self._hard_stop(signum)
            stopping = self._forwarded > 0
            for slot in self.slots:
                self._check(slot, stopping)
            if all(slot.proc is None and (slot.done or stopping) for slot in self.slots):
                return 1 if self._unclean else 0
            self._wake.wait(0.1)
            self._wake.clear()

    def _check(self, slot: _Slot, stopping: bool) -> None:
        """Reap ``slot``'s process if it ended; restart it when its back-off is over."""
        if slot.proc is not None:
            code = slot.proc.poll()
            if code is None:
                return
            pid, slot.proc = slot.proc.pid, None
            if self.on_exit is not None:
                self.on_exit(pid)
            self._ended(slot, pid, code, stopping)
        if slot.restart_at is not None and not stopping and time.monotonic() >= slot.restart_at:
            self._start(slot)

    def _ended(self, slot: _Slot, pid: int, code: int, stopping: bool) -> None:
        """Decide what a child's end means: done, a stop, a restart or the group's end."""
        who = f"worker {slot.number} (pid {pid})"
        if stopping:
            # a worker still starting up may die of the stop signal itself: nothing was lost
            if code not in (0, -SOFT_STOP, -signal.SIGTERM, -signal.SIGINT):
                self._unclean = True
                log.warning("%s %s while stopping", who, how_it_ended(code))
            return
        if code == 0 and self.stop_when_idle:
            slot.done = True
            log.info("%s is done: every partition is caught up", who)
            return
        if code == CONFIG_EXIT:
            log.error(
                "%s stopped with a configuration error (exit code 2): stopping all workers", who
            )
            raise GroupStopped(CONFIG_EXIT)
        quick = time.monotonic() - slot.started < QUICK_DEATH_SECONDS
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        if slot.quick_deaths >= MAX_QUICK_DEATHS:
            log.error(
                "%s %s; it died %d times in a row within %.0fs of its start: stopping all "
                "workers (see its error above)",
                who,
                how_it_ended(code),
                slot.quick_deaths,
                QUICK_DEATH_SECONDS,
            )
            raise GroupStopped(1)
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** max(0, slot.quick_deaths - 1))
        slot.restart_at = time.monotonic() + delay
        log.warning("%s %s; restarting in %.1fs", who, how_it_ended(code), delay)

    # -- processes ------------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        env = {
            **os.environ,
            **self.env,
            DSN_ENV: self.dsn,
            LABEL_ENV: f"{slot.number}/{len(self.slots)}",
            PARENT_ENV: str(os.getpid()),
        }
        slot.proc = subprocess.Popen(self.child_args, env=env, start_new_session=True)
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %d/%d started (pid %d)", slot.number, len(self.slots), slot.proc.pid)

    def _stop_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signum)

    def _wait_all(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the children, then kill the ones left."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.proc is None:
                continue
            left = max(0.0, deadline - time.monotonic())
            try:
                slot.proc.wait(left)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()

    def _hard_stop(self, signum: int) -> int:
        """The second signal: pass it on (the children exit at once) and exit 128 + signum."""
        log.warning(
            "received %s again: stopping the workers at once; their batches in flight roll back",
            signal.Signals(signum).name,
        )
        self._stop_all(HARD_STOP)
        self._wait_all(HARD_STOP_GRACE)
        return 128 + signum

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._signals:
            log.info(
                "received %s: stopping the workers after their batches in flight "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )
        self._signals.append(signum)
        self._wake.set()


def die_with_parent() -> None:
    """In a child started by :class:`Supervisor`: get SIGTERM when the supervisor dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere the child keeps running until it is
    stopped. If the supervisor is already gone, stop now.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:
        os.kill(os.getpid(), signal.SIGTERM)

"""Stopping on SIGTERM/SIGINT the way users expect from uvicorn and friends.

The first signal asks the worker to stop after the batch in flight (its COMMIT is the clean
end). A second one exits at once with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM): the
batch in flight is never committed, the server rolls its transaction back when the session
closes with the process, and the next owner of the partitions takes over. Nothing is lost: a
COMMIT whose outcome is unknown is decided by the next run from the partition row.

This module only uses the standard library, so ``pgstream run`` can install the handler
before it imports the app and the runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import NoReturn

__all__ = [
    "HARD_STOP",
    "SOFT_STOP",
    "SignalHandler",
    "cancel_on_exit_now",
    "exit_now",
    "stop_on_signal",
    "supervised_handlers",
]

#: lines ``pgstream run`` shows by default (start, progress, stop requests)
notice = logging.getLogger("pgstream.progress")

SignalHandler = Callable[[int, FrameType | None], None]

#: what ``run --workers N`` sends its workers: stop after the batch in flight (any number of
#: times), and exit at once. Not SIGTERM: a service manager that signals the whole group
#: (systemd's default ``KillMode=control-group``) would make one stop request count twice.
SOFT_STOP: int = getattr(signal, "SIGUSR1", signal.SIGTERM)  # (no SIGUSR* on Windows)
HARD_STOP: int = getattr(signal, "SIGUSR2", signal.SIGINT)

#: called by :func:`exit_now` before the process leaves (cancel the statement in flight)
_cancels: list[Callable[[], None]] = []


@contextlib.contextmanager
def cancel_on_exit_now(cancel: Callable[[], None]) -> Iterator[None]:
    """While in this block, :func:`exit_now` first calls ``cancel``, which must be safe in a
    signal handler (libpq's ``PQcancel`` is). A server busy in a statement (``pg_sleep``, a
    lock wait) notices a vanished client only when it next talks to it; the cancel makes it
    roll back and let go of the partition at once."""
    _cancels.append(cancel)
    try:
        yield
    finally:
        _cancels.remove(cancel)


def stop_on_signal(stop: threading.Event) -> SignalHandler:
    """A SIGTERM/SIGINT handler: the first signal sets ``stop``, a second one calls
    :func:`exit_now`."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            exit_now(signum)
        stop.set()
        notice.info(
            "received %s: stopping after the batch in flight (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    return handler


def supervised_handlers(stop: threading.Event) -> dict[int, SignalHandler]:
    """Handlers for :data:`SOFT_STOP` and :data:`HARD_STOP` in a worker of ``--workers N``."""

    def soft(_signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            notice.info("the supervisor asked to stop: stopping after the batch in flight")
        stop.set()

    def hard(signum: int, _frame: FrameType | None) -> None:
        exit_now(signum, "the supervisor asked to stop at once")

    return {SOFT_STOP: soft, HARD_STOP: hard}


def exit_now(signum: int, why: str | None = None) -> NoReturn:
    """Leave the process at once with ``128 + signum``; the batch in flight rolls back."""
    notice.warning(
        "%s: exiting now; the batch in flight is rolled back",
        why or f"received {signal.Signals(signum).name} again",
    )
    for cancel in list(_cancels):
        with contextlib.suppress(Exception):
            cancel()
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(128 + signum)

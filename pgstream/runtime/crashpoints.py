"""Test-only crash points: ``PGSTREAM_CRASH_AT=<point>`` SIGKILLs the worker there.

``PGSTREAM_CRASH_AFTER=N`` (default 1) crashes at the N-th time the point is reached.
Points, in batch order: ``after_read``, ``after_state``, ``after_sinks``, ``before_commit``,
``after_commit``. Unset, the check is one comparison against ``None``.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_read", "after_state", "after_sinks", "before_commit", "after_commit")

_target = os.environ.get("PGSTREAM_CRASH_AT") or None
_remaining = int(os.environ.get("PGSTREAM_CRASH_AFTER", "1"))


def crash_point(name: str) -> None:
    """SIGKILL this process if the test hook selects ``name``."""
    global _remaining
    if _target is None or _target != name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)

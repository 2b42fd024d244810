"""Test-only fault hooks, driven by environment variables (inert when unset).

* ``PGSTREAM_CRASH_AT=<point>`` SIGKILLs the worker at that point of the batch;
  ``PGSTREAM_CRASH_AFTER=N`` (default 1) picks the N-th time the point is reached.
  Points, in batch order: ``after_read``, ``after_state``, ``after_sinks``,
  ``before_commit``, ``after_commit``; and in ``pgstream dlq redrive``, per chunk:
  ``redrive_before_commit``, ``redrive_after_commit``; in ``pgstream rewind``:
  ``rewind_before_commit``; in ``pgstream rebuild``: ``rebuild_after_batch`` (a shadow
  batch committed during the catch-up), ``rebuild_after_gap`` and ``rebuild_before_commit``
  (inside the swap transaction).
* ``PGSTREAM_INJECT_ERRORS=40001,40P01,57014,53100`` makes the batch transaction raise one
  of these SQLSTATEs (server-side, so the real error class reaches the worker) with
  probability ``PGSTREAM_INJECT_RATE`` (default 0.3; 1.0 = a persistent error).
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import psycopg

POINTS = ("after_read", "after_state", "after_sinks", "before_commit", "after_commit")
#: the points of ``pgstream dlq redrive`` (one chunk transaction each)
REDRIVE_POINTS = ("redrive_before_commit", "redrive_after_commit")

_target = os.environ.get("PGSTREAM_CRASH_AT") or None
_remaining = int(os.environ.get("PGSTREAM_CRASH_AFTER", "1"))
_inject = [c.strip() for c in os.environ.get("PGSTREAM_INJECT_ERRORS", "").split(",") if c.strip()]
_inject_rate = float(os.environ.get("PGSTREAM_INJECT_RATE", "0.3"))

_RAISE = "DO $$ BEGIN RAISE EXCEPTION 'pgstream injected fault %s' USING ERRCODE = '%s'; END $$"


def crash_point(name: str) -> None:
    """SIGKILL this process if the test hook selects ``name``."""
    global _remaining
    if _target is None or _target != name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_inject_error(cur: psycopg.Cursor[Any]) -> None:
    """Raise an injected transient error inside the batch transaction, if configured."""
    if not _inject or random.random() >= _inject_rate:
        return
    code = random.choice(_inject)
    if not (len(code) == 5 and code.isalnum()):
        raise ValueError(f"PGSTREAM_INJECT_ERRORS: {code!r} is not a SQLSTATE")
    cur.execute((_RAISE % (code, code)).encode())

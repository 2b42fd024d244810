"""Which database errors are transient, and the backoff used to retry a whole batch.

The retry loop is our own few lines rather than tenacity's ``Retrying``: it runs at every
batch, and importing tenacity cost every run ~4 ms of its start-up.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import psycopg

from pgstream.runtime.checkpoint import CommitOutcomeUnknown

#: the first back-off (doubling at each failure in a row) and the jitter added to each, seconds
FIRST_WAIT = 0.05
#: the longest back-off, seconds (jitter aside)
MAX_WAIT = 5.0

#: told before each back-off: the number of the attempt that failed (1 for the first) and its error
RetryFn = Callable[[int, BaseException], None]


class RetryBatch(Exception):
    """Raised inside an attempt to retry the batch after recovery (e.g. it did not land)."""


def is_transient(exc: BaseException) -> bool:
    """Serialization failures, deadlocks, cancels, disk full, lost connections, restarts.

    psycopg maps all of these (SQLSTATE classes 08, 40, 53, 57) to ``OperationalError``.
    """
    return isinstance(exc, (psycopg.OperationalError, CommitOutcomeUnknown, RetryBatch))


def backoff(failures: int, first: float = FIRST_WAIT, longest: float = MAX_WAIT) -> float:
    """Seconds to wait after ``failures`` failures in a row: ``first`` doubling up to
    ``longest``, plus a random jitter of up to ``first``."""
    return min(longest, first * 2.0 ** (failures - 1)) + random.uniform(0, first)


class Attempt:
    """One attempt of :func:`batch_attempts`, used as ``with attempt:``. A transient error
    raised in its body is kept for a retry, unless this is the last attempt (then it
    propagates, as does any other error)."""

    def __init__(self, number: int, last: bool) -> None:
        self.number = number
        self.last = last
        self.error: BaseException | None = None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or self.last or not is_transient(exc):
            return False
        self.error = exc
        return True


def batch_attempts(max_attempts: int, on_retry: RetryFn | None = None) -> Iterator[Attempt]:
    """Up to ``max_attempts`` attempts (at least one), each run as ``with attempt:``; the loop
    ends after the first attempt without a transient error. Between attempts ``on_retry`` is
    told, then the :func:`backoff` (50 ms doubling up to 5 s, with jitter) is waited."""
    last = max(1, max_attempts)
    for number in range(1, last + 1):
        attempt = Attempt(number, last=number == last)
        yield attempt
        if attempt.error is None:
            return
        if on_retry is not None:
            on_retry(number, attempt.error)
        time.sleep(backoff(number))

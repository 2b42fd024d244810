"""Which database errors are transient, and the backoff used to retry a whole batch."""

from __future__ import annotations

import psycopg
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from pgstream.runtime.checkpoint import CommitOutcomeUnknown


class RetryBatch(Exception):
    """Raised inside an attempt to retry the batch after recovery (e.g. it did not land)."""


def is_transient(exc: BaseException) -> bool:
    """Serialization failures, deadlocks, cancels, disk full, lost connections, restarts.

    psycopg maps all of these (SQLSTATE classes 08, 40, 53, 57) to ``OperationalError``.
    """
    return isinstance(exc, (psycopg.OperationalError, CommitOutcomeUnknown, RetryBatch))


def batch_retrying(max_attempts: int, before_sleep: object = None) -> Retrying:
    """A tenacity policy: exponential backoff with jitter, 50 ms up to 5 s."""

    def _before_sleep(state: RetryCallState) -> None:
        if callable(before_sleep):
            before_sleep(state)

    return Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.05, max=5.0) + wait_random(0, 0.05),
        stop=stop_after_attempt(max_attempts),
        before_sleep=_before_sleep,
        reraise=True,
    )

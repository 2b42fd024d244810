"""A partition whose source's server went away: back off, reopen the reader, give up late.

A broker that cannot be reached (:class:`~pgstream.sources.base.SourceUnreachable`: down,
restarting, network cut) is not a reason to stop the job. The partition's task closes its
reader, waits (exponential back-off with jitter, 0.1 s doubling up to 5 s: tenacity's
``wait_exponential``), opens a new reader and reads again from its committed position, so
the job resumes exactly once when the broker is back. Other partitions go on meanwhile, and
the lease is renewed as usual. After ``Settings.max_retries`` failures in a row the worker
stops with one clear error.
"""

from __future__ import annotations

import logging
import time

from tenacity import wait_exponential, wait_random

from pgstream.errors import SourceUnavailableError
from pgstream.sources.base import PartitionReader, ReadResult, SourceUnreachable

log = logging.getLogger("pgstream.task")

_WAIT = wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.1)


class _Attempt:
    """What tenacity's wait strategies look at."""

    def __init__(self, number: int) -> None:
        self.attempt_number = number


class SourceOutage:
    """The outage state of one partition's source (``where`` names it in messages)."""

    def __init__(self, max_retries: int, where: str) -> None:
        self.max_retries = max_retries
        self.where = where
        self.failures = 0
        self.retry_at = 0.0
        self._since = 0.0

    @property
    def down(self) -> bool:
        """Whether the last read failed because the server could not be reached."""
        return self.failures > 0

    def waiting(self) -> bool:
        """Whether the back-off after the last failure is still running."""
        return self.down and time.monotonic() < self.retry_at

    def failed(self, exc: SourceUnreachable) -> float:
        """Count a failure and return the back-off; raise after ``max_retries`` in a row."""
        now = time.monotonic()
        if not self.down:
            self._since = now
        self.failures += 1
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        if self.failures > self.max_retries:
            raise SourceUnavailableError(
                f"{self.where}: the source could not be reached for {now - self._since:.0f}s "
                f"({self.max_retries} retries): {first}",
                hint="start the broker (or fix the network) and run again: the job resumes "
                "at its committed offset; ps.App(..., max_retries=N) sets how often it reconnects",
            ) from exc
        delay = float(_WAIT(_Attempt(self.failures)))  # type: ignore[arg-type]
        self.retry_at = now + delay
        log.warning(
            "%s: source unreachable (attempt %d of %d), reconnecting in %.1fs: %s",
            self.where, self.failures, self.max_retries, delay, first,
        )
        return delay

    def recovered(self) -> None:
        """A read succeeded: the outage (if any) is over."""
        if self.down:
            log.warning(
                "%s: the source is reachable again after %.1fs; resuming at the committed "
                "offset", self.where, time.monotonic() - self._since,
            )
        self.failures = 0


class UnreachableReader(PartitionReader):
    """Stands for a reader that could not be opened (its server was not reachable): every
    read raises the error again, so the task's outage handling reopens it."""

    def __init__(self, error: SourceUnreachable) -> None:
        self.error = error

    def read(self, start: int, max_records: int) -> ReadResult:
        """Raise the open's error."""
        raise SourceUnreachable(str(self.error))

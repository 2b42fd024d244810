"""Reading the next batch of a partition while the current one commits.

COMMIT is the database's work and reading and evaluating the next batch is Python's, so the two
overlap on one helper thread per partition. The helper never touches the checkpoint connection;
its result is used only if the batch before it committed as evaluated (it starts where that
batch ended), otherwise it is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for

from pgstream.runtime.reading import Ahead


class ReadAhead:
    """At most one batch of one partition in flight on a helper thread (``name`` labels it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[Ahead]] | None = None  # (its start, its result)

    def start(self, start: int, job: Callable[[], Ahead]) -> None:
        """Run ``job`` (which reads and evaluates the batch at ``start``) on the helper."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix=f"pgstream-read-ahead-{self.name}"
            )
        self._ahead = (start, self._executor.submit(job))

    def take(self, position: int) -> Ahead | None:
        """The read-ahead result if it starts at ``position`` (its read or evaluation error is
        raised here); a read-ahead from elsewhere (its batch did not commit) is dropped."""
        if self._ahead is None:
            return None
        if self._ahead[0] != position:
            self.cancel()
            return None
        future, self._ahead = self._ahead[1], None
        return future.result()

    def cancel(self) -> None:
        """Drop the read-ahead and its errors, waiting for it so the reader is free again."""
        if self._ahead is None:
            return
        future, self._ahead = self._ahead[1], None
        if not future.cancel():
            wait_for([future])

    def close(self) -> None:
        """Drop the read-ahead and stop the helper thread."""
        self.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

"""Records that kill the worker: commit around them, then set the killer aside.

Each batch attempt is counted in the partition row before the batch is evaluated
(``LeaseManager.bump_attempts``), so a record that crashes the process (a segfault in an
extension, an out-of-memory kill) shows up as a batch attempted again and again. Past
``max_record_attempts`` the batch is committed one record at a time, so the records before
the culprit commit and it comes first; past twice that, the first record is set aside as a
dead letter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pgstream.runtime.bisection import SetAsideFn
from pgstream.sources.base import SourceRecord

log = logging.getLogger("pgstream.task")

#: evaluates and commits ``records`` as the batch ``[start, end)``
RunFn = Callable[[list[SourceRecord], int, int], None]


class PoisonGuard:
    """Decides what to do with a batch of one partition that was attempted too often."""

    def __init__(self, limit: int, where: str, run: RunFn, set_aside: SetAsideFn) -> None:
        self.limit = limit
        self.where = where
        self._run = run
        self._set_aside = set_aside

    def suspect(self, attempts: int) -> bool:
        """Whether the batch was attempted more than ``max_record_attempts`` times."""
        return attempts > self.limit

    def handle(
        self,
        attempts: int,
        records: list[SourceRecord],
        start: int,
        end: int,
        position: Callable[[], int],
    ) -> int | None:
        """Commit the suspect batch ``[start, end)`` holding ``records`` carefully and return
        the records it handled, or None to commit it as usual (a batch of one record that
        has not died often enough to be set aside). ``position`` is the task's next offset."""
        if attempts > 2 * self.limit and records:
            # The first record has killed the worker again and again: set it aside.
            self._set_aside(
                records[0],
                start,
                _next_offset(records, 0, end),
                f"the worker died {attempts - 1} times in a row while processing this record",
                "worker",
            )
            return 1
        if len(records) > 1:
            # Something in this batch kills the worker: go through it one record per
            # batch, so the records before the culprit commit and it comes first in the
            # next batch (where it is set aside after ``limit`` more deaths). Shrinking to
            # the first record only would cost ``limit`` deaths per record before the
            # culprit.
            log.warning(
                "%s: the worker died %d times on the batch at offset %s: "
                "committing it one record at a time",
                self.where,
                attempts - 1,
                start,
            )
            for i in range(len(records)):
                self._run(records[i : i + 1], position(), _next_offset(records, i, end))
            return len(records)
        return None


def _next_offset(records: list[SourceRecord], index: int, end: int) -> int:
    """The exclusive end of ``records[index]``: the next record's offset, or ``end``."""
    return records[index + 1].offset if index + 1 < len(records) else end

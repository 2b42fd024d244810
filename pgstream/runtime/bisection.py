"""Finding the record a sink rejects: bisect the batch down to it and set it aside.

When the database rejects a batch's sink rows (:class:`~pgstream.runtime.checkpoint.SinkDataError`),
the batch is split in halves that are evaluated and committed on their own, down to the one bad
record, which becomes a dead letter. Before bisecting, :mod:`pgstream.runtime.rejections` tells
a bad record from a sink that rejects every record (which stops the job instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgstream.config import Settings
from pgstream.runtime.checkpoint import SinkDataError, probe_sinks
from pgstream.runtime.connection import WorkerConnection
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.sources.base import SourceRecord

if TYPE_CHECKING:  # loaded when a sink first rejects a row (never, in most runs)
    from pgstream.runtime.rejections import Reason

log = logging.getLogger("pgstream.task")

#: commits an evaluated output as the batch ``[start, end)``
CommitFn = Callable[[BatchOutput, int, int], None]
#: sets a record aside as the batch ``[start, end)``: (record, start, end, error, operator)
SetAsideFn = Callable[[SourceRecord, int, int, str, str], None]


class SinkRejections:
    """Bisects the batches of one partition whose sink rows the database rejects."""

    def __init__(
        self,
        pipeline: Pipeline,
        db: WorkerConnection,
        settings: Settings,
        where: str,
        commit: CommitFn,
        set_aside: SetAsideFn,
    ) -> None:
        self.pipeline = pipeline
        self.db = db
        self.settings = settings
        self.where = where
        self._commit = commit
        self._set_aside = set_aside
        #: the reason shared by the last records the sink rejected alone at the end of their
        #: batches, and how many in a row (see :meth:`_count_lone_rejection`)
        self._lone: tuple[Reason, int] | None = None

    def taken(self) -> None:
        """A committed batch held a record the sink took."""
        self._lone = None

    def run(
        self,
        records: list[SourceRecord],
        start: int,
        end: int,
        rest: list[SourceRecord] | None = None,
    ) -> None:
        """Evaluate and commit ``records`` as one batch; ``rest`` is them and the records
        after them in the batch being bisected (for :meth:`rejected`)."""
        out = self.pipeline.evaluate(records)
        try:
            self._commit(out, start, end)
        except SinkDataError as exc:
            self.rejected(records, start, end, exc, records if rest is None else rest)

    def rejected(
        self,
        records: list[SourceRecord],
        start: int,
        end: int,
        exc: SinkDataError,
        rest: list[SourceRecord],
    ) -> None:
        """The sink rejected a row of ``records``: stop if it rejects every record, else
        bisect down to the bad record and set it aside. ``rest`` starts with ``records`` and
        goes on to the end of the batch read (what :meth:`_stop_if_everything_rejected` tries).
        """
        if not records:
            raise exc
        self._stop_if_everything_rejected(rest, start)
        if len(records) == 1:
            if len(rest) == 1:
                self._count_lone_rejection(exc, start)
            self._set_aside(records[0], start, end, f"sink rejected: {exc}", "sink")
            return
        mid = len(records) // 2
        split = records[mid].offset
        log.info("sink rejected a row in [%s, %s): bisecting at %s", start, end, split)
        self.run(records[:mid], start, split, rest)
        self.run(records[mid:], split, end, rest[mid:])

    def _stop_if_everything_rejected(self, rest: list[SourceRecord], start: int) -> None:
        """Raise :class:`~pgstream.errors.SinkRejectedError` when each of the first
        ``max_sink_rejections`` records of ``rest`` (at least two; all when fewer are left),
        written alone and rolled back, is rejected for the same reason (see
        :mod:`pgstream.runtime.rejections`). ``start`` is the first one's offset.
        """
        from pgstream.runtime.rejections import Reason, rejects_everything

        probe = rest[: self.settings.max_sink_rejections]
        if len(probe) < 2:
            return
        first: SinkDataError | None = None
        for rec in probe:
            rejection = probe_sinks(self.db.conn, self.pipeline, self.pipeline.evaluate([rec]))
            if rejection is None:
                return  # a record the sink takes: bisect
            if first is None:
                first = rejection
            elif Reason.of(rejection) != Reason.of(first):
                return  # bad records, each bad its own way: bisect
        assert first is not None
        raise rejects_everything(first, len(probe), self.where, start)

    def _count_lone_rejection(self, exc: SinkDataError, start: int) -> None:
        """A batch's last record, rejected alone, cannot be compared with the records after
        it (batches of one record on a quiet stream): stop at the ``max_sink_rejections``-th
        such rejection in a row for one reason with no record taken in between (the earlier
        ones are dead letters by then)."""
        from pgstream.runtime.rejections import Reason, rejects_everything

        reason = Reason.of(exc)
        count = self._lone[1] + 1 if self._lone is not None and self._lone[0] == reason else 1
        self._lone = (reason, count)
        limit = self.settings.max_sink_rejections
        if limit and count >= limit:
            self._lone = None
            raise rejects_everything(exc, count, self.where, start, dead_lettered=count - 1)

"""Reading one partition in batches and evaluating them through the pipeline.

A batch is one or more chunks read from the partition's reader; each chunk is evaluated into
the batch's output as soon as it is read and then released, so a batch that only aggregates or
folds costs the memory of one chunk however big it grows. The rare paths that need a batch's
records again (poison records, sink rejections) read them again: sources replay by offset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pgstream.config import Settings
from pgstream.runtime.batching import CHUNK, BatchSizer, InputBatch
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.sources.base import PartitionReader, SourceError, SourceRecord
from pgstream.sources.raw import RawReader
from pgstream.sources.table import TableReader


@dataclass(slots=True)
class Ahead:
    """A batch read and evaluated ahead of time (``out`` is None when it holds nothing)."""

    batch: InputBatch
    out: BatchOutput | None


class BatchReader:
    """Reads and evaluates the batches of one partition (``where`` names it in errors)."""

    def __init__(
        self,
        reader: PartitionReader,
        pipeline: Pipeline,
        sizer: BatchSizer,
        settings: Settings,
        where: str,
    ) -> None:
        self.reader = reader
        self.pipeline = pipeline
        self.sizer = sizer
        self.settings = settings
        self.where = where
        #: only a table's sink paths can run in SQL (pushed down: pgstream.runtime.pushdown)
        self._table = isinstance(reader, TableReader)

    def first_chunk(self, start: int) -> InputBatch:
        """The first chunk of the batch at ``start`` (not evaluated yet: see :meth:`fill`);
        when every sink path runs in SQL, the whole batch, counted but not read."""
        if self._table and self.pipeline.sql_only:
            assert isinstance(self.reader, TableReader)
            span = self.reader.read_span(start, self.sizer.limit)
            return InputBatch(start, span.end, span.head, released=span.records, in_sql=True)
        return self._read_once(start, self.sizer.first_chunk)

    def fill(self, batch: InputBatch, pending: BatchOutput | None) -> BatchOutput:
        """Evaluate ``batch`` (a first chunk), then read and evaluate more chunks into the same
        output until the batch holds ``sizer.limit`` records, the source has nothing more, or
        ``max_interval`` has passed. Chunks are released once evaluated, so a batch that only
        aggregates or folds costs the memory of one chunk however big it grows."""
        batch.limit = limit = self.sizer.limit
        if batch.in_sql:
            out = self.pipeline.evaluate([], pending, in_sql=True)
            out.records_in = len(batch)
            batch.evaluated_in = time.monotonic() - batch.read_at
            return out
        out = self._evaluate(batch, pending, None)
        deadline = batch.read_at + self.settings.max_interval
        while len(batch) < limit and time.monotonic() < deadline:
            more = self._read_once(batch.end, min(limit - len(batch), CHUNK))
            if more.end == batch.end:
                break
            self._evaluate(more, pending, out)
            batch.extend(more)
        batch.evaluated_in = time.monotonic() - batch.read_at
        return out

    def prepare(self, start: int, pending: BatchOutput) -> Ahead:
        """Read and evaluate the batch at ``start`` (the read-ahead thread's job)."""
        batch = self.first_chunk(start)
        out = self.fill(batch, pending) if batch.end > start else None
        return Ahead(batch, out)

    def records(self, batch: InputBatch) -> list[SourceRecord]:
        """The batch's records, read again from the source if they were released."""
        if batch.released is None:
            return batch.decoded()
        records: list[SourceRecord] = []
        pos = batch.start
        while pos < batch.end:
            more = self._read_once(pos, max(1, len(batch) - len(records)))
            if more.end <= pos:
                raise SourceError(
                    f"{self.where}: offsets [{pos}, {batch.end}) could not be read again"
                )
            records += [r for r in more.decoded() if r.offset < batch.end]
            pos = more.end
        return records

    def close(self) -> None:
        """Release the partition's reader."""
        self.reader.close()

    def _read_once(self, start: int, size: int) -> InputBatch:
        if isinstance(self.reader, RawReader):
            raw = self.reader.read_raw(start, size)
            return InputBatch(start, raw.end, raw.head, lines=raw)
        res = self.reader.read(start, size)
        return InputBatch(start, res.end, res.head, records=res.records)

    def _evaluate(
        self, batch: InputBatch, pending: BatchOutput | None, into: BatchOutput | None
    ) -> BatchOutput:
        if batch.lines is not None:
            out = self.pipeline.evaluate_raw(batch.lines, pending, into)
        elif self._table:
            out = self.pipeline.evaluate(batch.decoded(), pending, into, in_sql=True)
        else:
            out = self.pipeline.evaluate(batch.decoded(), pending, into)
        batch.release()
        return out


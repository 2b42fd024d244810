"""How big a partition's batches are: one read of input, and the size the next ones may reach.

A task starts with small batches (:data:`FIRST_BATCH`) and lets :class:`BatchSizer` adapt them
to ``Settings.target_latency``: a full batch read and evaluated well under it lets the next
ones grow (:meth:`BatchSizer.grow`), a COMMIT that lands too long after its read halves them
(:meth:`BatchSizer.settle`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pgstream.config import Settings
from pgstream.sources.base import SourceRecord
from pgstream.sources.raw import RawBatch

#: records in the first batch after a task starts; batches then adapt (``grow``, ``settle``)
FIRST_BATCH = 5_000
#: most records read (and held undecoded or decoded) at once; a batch is one or more chunks
CHUNK = 50_000
#: the most records per batch unless ``Settings.batch_size`` says otherwise: for pipelines
#: whose output grows with the records (append sinks, batch handlers), and for the others
#: (aggregates, folds), whose output grows with the keys touched
DEFAULT_BATCH = 100_000
KEYED_BATCH = 400_000


@dataclass(slots=True)
class InputBatch:
    """One read of a partition, covering the offsets ``[start, end)``: decoded records, or
    JSON lines that the pipeline decodes while it evaluates them.

    Once evaluated, the input is released (:meth:`release`): only rare paths need it again
    and they read it again from the source, which is replayable by offset.
    """

    start: int
    end: int
    head: int | None
    records: list[SourceRecord] | None = None
    lines: RawBatch | None = None
    read_at: float = field(default_factory=time.monotonic)
    released: int | None = None  # the number of records, once the input is released
    limit: int = 0  # the most records it was read to hold
    evaluated_in: float = 0.0  # seconds to read and evaluate it
    in_sql: bool = False  # only counted, not read: every sink path writes it in SQL

    def __len__(self) -> int:
        if self.released is not None:
            return self.released
        return len(self.lines) if self.lines is not None else len(self.records or ())

    def release(self) -> None:
        """Drop the input (keeping its size)."""
        self.released = len(self)
        self.records = self.lines = None

    def decoded(self) -> list[SourceRecord]:
        """The batch as records (decoding the lines on first use)."""
        if self.records is None:
            self.records = self.lines.records() if self.lines is not None else []
        return self.records

    def extend(self, more: InputBatch) -> None:
        """Add the (evaluated, released) read that continued where this one ended."""
        assert self.released is not None and more.released is not None
        self.released += more.released
        self.end, self.head = more.end, more.head


class BatchSizer:
    """The most records the next batch of one partition may hold (:attr:`limit`)."""

    def __init__(self, settings: Settings, *, per_record_output: bool) -> None:
        self.settings = settings
        self.cap = settings.batch_size or (DEFAULT_BATCH if per_record_output else KEYED_BATCH)
        self.limit = min(self.cap, FIRST_BATCH)
        self._last_latency = 0.0

    @property
    def first_chunk(self) -> int:
        """How many records the first read of a batch asks for."""
        return min(self.limit, CHUNK)

    def grow(self, batch: InputBatch) -> None:
        """Before reading ahead: after a full batch that took well under ``target_latency`` to
        read and evaluate (sixteenfold below a 32nd of it, fourfold below an eighth, twofold
        below a quarter), the next batches may hold more, unless the last COMMIT came over half
        of it after its read. A backlog thus reaches big batches in a step or two: the small
        first batch only bounds the first COMMIT's latency."""
        target = self.settings.target_latency
        if len(batch) < batch.limit or self._last_latency > target / 2:
            return
        if batch.evaluated_in < target / 32:
            factor = 16
        elif batch.evaluated_in < target / 8:
            factor = 4
        elif batch.evaluated_in < target / 4:
            factor = 2
        else:
            return
        self.limit = min(self.cap, max(self.limit, batch.limit * factor))

    def settle(self, size: int, latency: float) -> None:
        """After a COMMIT ``latency`` seconds after its batch was read: over
        ``target_latency`` halves the next batches."""
        self._last_latency = latency
        if latency > self.settings.target_latency:
            self.limit = max(1, min(self.limit, size) // 2)

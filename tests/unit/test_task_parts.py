"""The parts a partition task is made of, each alone: batch sizing, reading and re-reading,
read-ahead, and what to do with a batch that killed the worker."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest
from memory_source import MemorySource

from pgstream.config import Settings
from pgstream.runtime.batching import (
    CHUNK,
    DEFAULT_BATCH,
    FIRST_BATCH,
    KEYED_BATCH,
    BatchSizer,
    InputBatch,
)
from pgstream.runtime.pipeline import BatchOutput, Pipeline
from pgstream.runtime.poison import PoisonGuard
from pgstream.runtime.readahead import ReadAhead
from pgstream.runtime.reading import Ahead, BatchReader
from pgstream.sources.base import OpenContext, SourceError, SourceRecord

# -- batch sizing --------------------------------------------------------------------------------


def _full(limit: int, seconds: float) -> InputBatch:
    batch = InputBatch(0, limit, None, records=[SourceRecord(i, {}) for i in range(limit)])
    batch.limit, batch.evaluated_in = limit, seconds
    return batch


def test_the_first_batch_is_small_and_the_cap_depends_on_the_output() -> None:
    assert BatchSizer(Settings(), per_record_output=True).cap == DEFAULT_BATCH
    assert BatchSizer(Settings(), per_record_output=False).cap == KEYED_BATCH
    sizer = BatchSizer(Settings(batch_size=30), per_record_output=True)
    assert (sizer.cap, sizer.limit, sizer.first_chunk) == (30, 30, 30)
    big = BatchSizer(Settings(), per_record_output=False)
    assert (big.limit, big.first_chunk) == (FIRST_BATCH, FIRST_BATCH)
    big.limit = KEYED_BATCH
    assert big.first_chunk == CHUNK


def test_fast_full_batches_grow_fourfold_or_twofold_up_to_the_cap() -> None:
    sizer = BatchSizer(Settings(target_latency=1.0), per_record_output=True)
    sizer.grow(_full(FIRST_BATCH, 0.1))  # under an eighth of the target
    assert sizer.limit == 4 * FIRST_BATCH
    sizer.grow(_full(sizer.limit, 0.2))  # under a quarter
    assert sizer.limit == 8 * FIRST_BATCH
    sizer.grow(_full(sizer.limit, 0.3))  # not fast enough
    assert sizer.limit == 8 * FIRST_BATCH
    sizer.grow(_full(sizer.limit, 0.01))
    assert sizer.limit == DEFAULT_BATCH  # capped


def test_a_very_fast_first_batch_grows_sixteenfold() -> None:
    sizer = BatchSizer(Settings(target_latency=1.0), per_record_output=False)
    sizer.grow(_full(FIRST_BATCH, 0.02))  # under a 32nd of the target
    assert sizer.limit == 16 * FIRST_BATCH
    sizer.grow(_full(sizer.limit, 0.05))  # an eighth: fourfold
    assert sizer.limit == 64 * FIRST_BATCH
    sizer.grow(_full(sizer.limit, 0.01))
    assert sizer.limit == KEYED_BATCH  # capped


def test_partial_batches_and_slow_commits_do_not_grow_and_late_commits_halve() -> None:
    sizer = BatchSizer(Settings(target_latency=1.0), per_record_output=True)
    partial = _full(FIRST_BATCH, 0.01)
    partial.limit = FIRST_BATCH + 1
    sizer.grow(partial)
    assert sizer.limit == FIRST_BATCH
    sizer.settle(FIRST_BATCH, 0.6)  # over half the target: no growth next time
    sizer.grow(_full(FIRST_BATCH, 0.01))
    assert sizer.limit == FIRST_BATCH
    sizer.settle(1000, 1.5)  # over the target: half of the smaller of limit and size
    assert sizer.limit == 500
    sizer.settle(1, 9.0)
    assert sizer.limit == 1  # never below one


# -- reading -------------------------------------------------------------------------------------


class CountingPipeline:
    """Stands in for the pipeline: counts the records it evaluates."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def evaluate(
        self, records: list[SourceRecord], pending: Any = None, into: BatchOutput | None = None
    ) -> BatchOutput:
        out = into or BatchOutput("s", "0", [])
        out.records_in += len(records)
        self.seen += [r.offset for r in records]
        return out


def _reader(n: int, *, batch_size: int, max_interval: float = 5.0) -> BatchReader:
    source = MemorySource("m", {"0": [{"i": i} for i in range(n)]})
    settings = Settings(batch_size=batch_size, max_interval=max_interval)
    sizer = BatchSizer(settings, per_record_output=True)
    pipeline = cast(Pipeline, CountingPipeline())
    return BatchReader(source.open("0", OpenContext("")), pipeline, sizer, settings, "s/0")


def test_a_batch_is_filled_chunk_by_chunk_up_to_the_limit_and_released() -> None:
    reader = _reader(25, batch_size=10)
    batch = reader.first_chunk(0)
    assert (batch.start, batch.end, len(batch)) == (0, 10, 10)
    out = reader.fill(batch, None)
    assert (out.records_in, batch.end, len(batch), batch.records) == (10, 10, 10, None)
    reader.sizer.limit = 100  # a bigger batch than one read returns
    rest = reader.first_chunk(10)
    rest_out = reader.fill(rest, None)
    assert (rest_out.records_in, rest.start, rest.end) == (15, 10, 25)
    assert cast(CountingPipeline, reader.pipeline).seen == list(range(25))


def test_released_records_are_read_again_from_the_source() -> None:
    reader = _reader(30, batch_size=30)
    batch = reader.first_chunk(5)
    reader.fill(batch, None)
    assert batch.released == 25
    assert [r.offset for r in reader.records(batch)] == list(range(5, 30))


def test_records_that_cannot_be_read_again_stop_with_a_source_error() -> None:
    reader = _reader(10, batch_size=10)
    batch = reader.first_chunk(0)
    reader.fill(batch, None)
    batch.end = 12  # more than the source holds now (a truncated input)
    with pytest.raises(SourceError, match=r"s/0: offsets \[10, 12\) could not be read again"):
        reader.records(batch)


# -- read-ahead ----------------------------------------------------------------------------------


def _ahead(start: int) -> Ahead:
    return Ahead(InputBatch(start, start + 1, None, records=[]), None)


def test_read_ahead_is_taken_only_where_it_starts() -> None:
    ahead = ReadAhead("s/0")
    assert ahead.take(0) is None
    ahead.start(5, lambda: _ahead(5))
    taken = ahead.take(5)
    assert taken is not None and taken.batch.start == 5
    assert ahead.take(5) is None  # taken once
    ahead.start(7, lambda: _ahead(7))
    assert ahead.take(6) is None  # the batch before it did not commit as evaluated: dropped
    assert ahead.take(7) is None
    ahead.close()


def test_read_ahead_errors_surface_when_taken_and_vanish_when_cancelled() -> None:
    def fail() -> Ahead:
        raise SourceError("gone")

    ahead = ReadAhead("s/0")
    ahead.start(1, fail)
    with pytest.raises(SourceError, match="gone"):
        ahead.take(1)
    ahead.start(1, fail)
    ahead.cancel()
    assert ahead.take(1) is None
    ahead.close()


def test_cancel_waits_for_a_running_read_ahead() -> None:
    started, done = threading.Event(), threading.Event()

    def slow() -> Ahead:
        started.set()
        time.sleep(0.2)
        done.set()
        return _ahead(0)

    ahead = ReadAhead("s/0")
    ahead.start(0, slow)
    started.wait(5)
    ahead.cancel()
    assert done.is_set()  # the reader is free again
    ahead.close()


# -- records that kill the worker ----------------------------------------------------------------


def _records(*offsets: int) -> list[SourceRecord]:
    return [SourceRecord(o, {"o": o}) for o in offsets]


def test_a_batch_that_killed_the_worker_is_committed_one_record_at_a_time() -> None:
    runs: list[tuple[list[int], int, int]] = []
    aside: list[Any] = []
    position = [10]

    def run(records: list[SourceRecord], start: int, end: int) -> None:
        runs.append(([r.offset for r in records], start, end))
        position[0] = end

    guard = PoisonGuard(3, "s/0", run, lambda *a: aside.append(a))
    assert not guard.suspect(3) and guard.suspect(4)
    assert guard.handle(4, _records(10, 12, 13), 10, 15, lambda: position[0]) == 3
    assert runs == [([10], 10, 12), ([12], 12, 13), ([13], 13, 15)]
    assert aside == []
    # one record alone, not yet dead often enough: committed as usual
    assert guard.handle(5, _records(20), 20, 21, lambda: 20) is None


def test_a_record_that_killed_the_worker_twice_the_limit_is_set_aside() -> None:
    aside: list[Any] = []
    guard = PoisonGuard(3, "s/0", lambda *a: None, lambda *a: aside.append(a))
    assert guard.handle(7, _records(20, 21), 20, 25, lambda: 20) == 1
    ((record, start, end, error, operator),) = aside
    assert (record.offset, start, end, operator) == (20, 20, 21, "worker")
    assert error == "the worker died 6 times in a row while processing this record"

"""An in-memory source with any number of partitions, for tests of the runtime.

Each partition is a list of records; a record's offset is its index. Records can be added
while a worker runs (:meth:`MemorySource.append`). The source notes what it was asked to open
and read, so tests can check how the runtime used it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from pgstream.sources.base import (
    OpenContext,
    PartitionReader,
    ReadResult,
    Record,
    Source,
    SourceError,
    SourceRecord,
)


class MemorySource(Source):
    """Partitions named by ``data``'s keys, each holding its list of records."""

    kind = "memory"

    def __init__(self, name: str, data: dict[str, list[Record]]) -> None:
        self.name = name
        self.data = {p: list(records) for p, records in data.items()}
        self.opened: list[tuple[str, OpenContext]] = []
        self.reads: list[tuple[str, int, int]] = []  # (partition, start, end)

    def append(self, partition: str, *records: Record) -> None:
        """Add records at the end of ``partition``."""
        self.data[partition].extend(records)

    def add_partition(self, partition: str, *records: Record) -> None:
        """Make a new partition appear (a worker finds it in its lease maintenance)."""
        self.data[partition] = list(records)

    def single_partition(self) -> bool:
        return len(self.data) == 1

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        return sorted(self.data)

    def initial_offset(self, partition: str) -> int:
        return 0

    def open(self, partition: str, context: OpenContext) -> MemoryReader:
        if partition not in self.data:
            raise SourceError(f"{self.describe()} has no partition {partition!r}")
        self.opened.append((partition, context))
        return MemoryReader(self, partition)

    def describe(self) -> str:
        return f"memory {self.name}"

    def identity(self) -> str:
        return f"memory {self.name}"


class MemoryReader(PartitionReader):
    """Reads one partition of a :class:`MemorySource`."""

    def __init__(self, source: MemorySource, partition: str) -> None:
        self.source = source
        self.partition = partition
        self.closed = False

    def read(self, start: int, max_records: int) -> ReadResult:
        records = self.source.data[self.partition]
        end = min(len(records), start + max_records)
        self.source.reads.append((self.partition, start, end))
        return ReadResult(
            [SourceRecord(i, records[i]) for i in range(start, end)], max(start, end), len(records)
        )

    def head(self) -> int | None:
        return len(self.source.data[self.partition])

    def close(self) -> None:
        self.closed = True

"""The second stage of a repartition: ``pgstream.repartition`` read as a partitioned source.

A fold keyed differently from how its source is partitioned runs in two stages (see
:mod:`pgstream.runtime.repartition`). The first stage writes every keyed record into
``pgstream.repartition`` inside its own batch transaction, in repartition partition
:func:`partition_of` (a stable hash of the key's JSON). This module reads those rows back: one
pgstream partition per repartition partition, offset = the row's ``id`` (a CACHE 1 sequence).

First-stage writers commit out of ``id`` order, exactly like the writers of a table source, so
the reader *is* a :class:`~pgstream.sources.table.TableReader` (it reads only below the table's
safe horizon) with a filter on the job, the stream and the partition. Records reach the fold
as ``{"key": <the key>, "payload": <the record>}``: the key is the one the first stage
computed and hashed, so it is never recomputed from a JSON copy of the record.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql

from pgstream.db.queries import SCHEMA
from pgstream.errors import ConfigError
from pgstream.operators.steps import Step
from pgstream.sources.base import OpenContext, SourceError, TableRead
from pgstream.sources.table import TableReader, TableSource

__all__ = [
    "DEFAULT_PARTITIONS",
    "Repartition",
    "RepartitionReader",
    "RepartitionSource",
    "partition_of",
]

#: repartition partitions when neither ``fold(partitions=)`` nor the source gives a count
DEFAULT_PARTITIONS = 8
#: the columns the second stage reads
_COLUMNS = ("id", "key", "payload")


def partition_of(key_json: bytes, partitions: int) -> int:
    """The repartition partition of a key: CRC-32 of its JSON text modulo ``partitions``
    (the same in every process, platform and Python version)."""
    return zlib.crc32(key_json) % partitions


@dataclass(frozen=True, slots=True)
class Repartition:
    """How a fold's records reach it: read from ``upstream``, run through ``steps``, keyed,
    handed over through ``pgstream.repartition`` as stream ``stream`` in ``partitions``
    partitions (``prune``: delete the rows the fold consumed)."""

    upstream: str
    steps: tuple[Step, ...]
    stream: str
    partitions: int
    #: delete rows the fold has consumed, during the second stage's maintenance
    prune: bool = False


class RepartitionSource(TableSource):
    """The rows one repartition's first stage wrote for ``job``/``stream``: partitions
    ``"0"`` .. ``"N-1"``, each read below the safe horizon of ``pgstream.repartition``."""

    kind = "repartition"

    def __init__(self, job: str, stream: str, upstream: str, partitions: int) -> None:
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"a repartition needs partitions >= 1, got {partitions!r}")
        super().__init__(
            f"{SCHEMA}.repartition",  # pgstream.db.tables.repartition
            offset_column="id",
            columns=_COLUMNS,
            partitions=partitions,
            partition_by="rpart" if partitions > 1 else None,
        )
        self.job = job
        self.stream = stream
        self.upstream = upstream

    def single_partition(self) -> bool:
        """Records of one key are in one partition whatever the count: the fold's state
        never splits."""
        return True

    def partition_filter(self, partition: str) -> sql.Composable:
        """This job's and stream's rows of one repartition partition."""
        return sql.SQL("job = {job} AND stream = {stream} AND rpart = {p}").format(
            job=sql.Literal(self.job),
            stream=sql.Literal(self.stream),
            p=sql.Literal(int(partition)),
        )

    def identity(self) -> str:
        """``repartition of <upstream> into <N> partitions``: another count is another
        meaning of the offsets' partitions (refused at start, like a re-split table)."""
        return f"repartition of {self.upstream} into {self.n_partitions} partitions"

    def describe(self) -> str:
        """``repartition of stream 'orders' (8 partitions)``."""
        return f"repartition of stream {self.upstream!r} ({self.n_partitions} partitions)"

    def tables_read(self) -> list[TableRead]:
        """None beyond pgstream's own tables (the runtime role has those already)."""
        return []

    def regclass_text(self) -> str:
        """``"pgstream"."repartition"``."""
        return TableRead(self.schema, self.relname, self.offset_column).regclass_text()

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Nothing to check: the table is pgstream's own (the schema check covers it)."""

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """``"0"`` .. ``"N-1"``."""
        return [str(i) for i in range(self.n_partitions)]

    def open(self, partition: str, context: OpenContext) -> RepartitionReader:
        """A safe-horizon reader of one repartition partition."""
        if partition not in {str(i) for i in range(self.n_partitions)}:
            raise SourceError(
                f"{self.describe()} has partitions 0..{self.n_partitions - 1}, not {partition!r}"
            )
        return RepartitionReader(self, context.dsn, partition)

    def __repr__(self) -> str:
        return (
            f"RepartitionSource(job={self.job!r}, stream={self.stream!r}, "
            f"upstream={self.upstream!r}, partitions={self.n_partitions})"
        )


class RepartitionReader(TableReader):
    """A :class:`~pgstream.sources.table.TableReader` whose records hold ``key`` (decoded
    from its JSON text) and ``payload`` (the record handed over), beside the row's other
    columns."""

    def _fetch(self, lo: int, hi: int, limit: int) -> list[tuple[Any, ...]]:
        rows = super()._fetch(lo, hi, limit)
        k = (self._names or _COLUMNS).index("key")
        return [(*row[:k], orjson.loads(row[k]), *row[k + 1 :]) for row in rows]

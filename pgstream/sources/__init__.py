"""Replayable, offset-addressed sources."""

from typing import TYPE_CHECKING

from pgstream.lazy import lazy_attributes
from pgstream.sources.base import (
    OpenContext,
    PartitionReader,
    ReadResult,
    Skip,
    Source,
    SourceError,
    SourceRecord,
    SourceUnreachable,
)
from pgstream.sources.file import FileSource
from pgstream.sources.table import TableSource

if TYPE_CHECKING:
    from pgstream.sources.kafka import KafkaSource
    from pgstream.sources.nats import NatsSource
    from pgstream.sources.redis_stream import RedisStreamSource

#: the broker sources, imported on first use (an app without them does not pay for them)
_LAZY = {
    "KafkaSource": "pgstream.sources.kafka",
    "NatsSource": "pgstream.sources.nats",
    "RedisStreamSource": "pgstream.sources.redis_stream",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "FileSource",
    "KafkaSource",
    "NatsSource",
    "OpenContext",
    "PartitionReader",
    "ReadResult",
    "RedisStreamSource",
    "Skip",
    "Source",
    "SourceError",
    "SourceRecord",
    "SourceUnreachable",
    "TableSource",
]

"""Replayable, offset-addressed sources."""

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
from pgstream.sources.kafka import KafkaSource
from pgstream.sources.nats import NatsSource
from pgstream.sources.redis_stream import RedisStreamSource
from pgstream.sources.table import TableSource

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

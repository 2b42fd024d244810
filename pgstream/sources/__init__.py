"""Replayable, offset-addressed sources."""

from pgstream.sources.base import (
    OpenContext,
    PartitionReader,
    ReadResult,
    Source,
    SourceError,
    SourceRecord,
)
from pgstream.sources.file import FileSource
from pgstream.sources.kafka import KafkaSource
from pgstream.sources.table import TableSource

__all__ = [
    "FileSource",
    "KafkaSource",
    "OpenContext",
    "PartitionReader",
    "ReadResult",
    "Source",
    "SourceError",
    "SourceRecord",
    "TableSource",
]

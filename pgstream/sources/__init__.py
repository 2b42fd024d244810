"""Replayable, offset-addressed sources."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    """``KafkaSource``, ``NatsSource``, ``RedisStreamSource``: imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'pgstream.sources' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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

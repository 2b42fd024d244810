"""pgstream: exactly-once stream processing for Python where PostgreSQL is the checkpoint.

>>> import pgstream as ps
>>> app = ps.App("shop")
>>> orders = app.stream("orders", ps.FileSource("orders.jsonl"))
>>> orders.key_by("user_id").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("totals")
"""

from pgstream.api import App, Batch, KeyedStream, Stream
from pgstream.config import Settings
from pgstream.errors import PgStreamError
from pgstream.expressions import Expr, coalesce, col, lit
from pgstream.operators.aggregates import Aggregate, avg, count
from pgstream.operators.aggregates import max_ as max
from pgstream.operators.aggregates import min_ as min
from pgstream.operators.aggregates import sum_ as sum
from pgstream.operators.sessions import session
from pgstream.operators.windows import hopping, tumbling
from pgstream.sources import (
    FileSource,
    KafkaSource,
    NatsSource,
    RedisStreamSource,
    Source,
    TableSource,
)

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "App",
    "Batch",
    "Expr",
    "FileSource",
    "KafkaSource",
    "KeyedStream",
    "NatsSource",
    "PgStreamError",
    "RedisStreamSource",
    "Settings",
    "Source",
    "Stream",
    "TableSource",
    "avg",
    "coalesce",
    "col",
    "count",
    "hopping",
    "lit",
    "max",
    "min",
    "session",
    "sum",
    "tumbling",
]

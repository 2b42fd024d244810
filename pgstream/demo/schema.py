"""The demo's sink tables, defined with :mod:`pgstream.schema` helpers (SQLAlchemy Core).

In a real project these tables go in your own Alembic migrations
(``alembic revision --autogenerate`` picks them up from this metadata); the demo simply
drops and recreates them with ``metadata.create_all`` so that every run starts clean.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, Text

from pgstream.schema import append_table, avg_columns, upsert_table

metadata = MetaData()

#: One row per paid order (append sink: ``paid.map(...).to_table(...)``).
order_facts = append_table(
    "demo_order_facts",
    metadata,
    Column("order_id", BigInteger, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("country", Text),
    Column("cents", BigInteger, nullable=False),
    Column("ordered_at", DateTime(timezone=True)),
)

#: Paid orders per user (upsert sink: ``key_by("user_id").aggregate(...)``).
user_totals = upsert_table(
    "demo_user_totals",
    metadata,
    Column("user_id", Text, primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("total_cents", BigInteger),
    *avg_columns("avg_cents"),
)

#: Each user's latest order and current run of paid orders (upsert sink of a ``fold``).
user_last = upsert_table(
    "demo_user_last",
    metadata,
    Column("user_id", Text, primary_key=True),
    Column("orders", BigInteger, nullable=False),
    Column("last_order_id", BigInteger),
    Column("last_order_at", DateTime(timezone=True)),
    Column("last_status", Text),
    Column("paid_streak", Integer, nullable=False),
)

TABLES = (order_facts, user_totals, user_last)

__all__ = ["TABLES", "metadata", "order_facts", "user_last", "user_totals"]

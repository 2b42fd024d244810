"""Repartition tables: keyed records handed from one stage of a job to the next.

Revision ID: 0006_repartition
Revises: 0005_status_views
Create Date: 2026-11-29

* ``repartition``: one row per keyed record written by a repartition's first stage (in its
  batch transaction), read by the second stage as a partitioned source. ``id`` (a CACHE 1
  sequence) is the second stage's offset, read below the same safe horizon as a table source;
  ``rpart`` is the repartition partition (a stable hash of ``key``). The upstream position
  ``(src_partition, src_offset, src_seq)`` is unique per stream: a record cannot be handed
  over twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_repartition"
down_revision: str | Sequence[str] | None = "0005_status_views"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "pgstream"


def upgrade() -> None:
    """Create pgstream.repartition and its read index."""
    op.create_table(
        "repartition",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("rpart", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("src_source", sa.Text(), nullable=False),
        sa.Column("src_partition", sa.Text(), nullable=False),
        sa.Column("src_offset", sa.BigInteger(), nullable=False),
        sa.Column("src_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="repartition_pkey"),
        sa.UniqueConstraint(
            "job",
            "stream",
            "src_partition",
            "src_offset",
            "src_seq",
            name="repartition_position_key",
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "repartition_read_idx",
        "repartition",
        ["job", "stream", "rpart", "id"],
        unique=False,
        schema=SCHEMA,
    )


def downgrade() -> None:
    """Drop pgstream.repartition."""
    op.drop_index("repartition_read_idx", table_name="repartition", schema=SCHEMA)
    op.drop_table("repartition", schema=SCHEMA)

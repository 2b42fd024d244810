"""Ranges of a broker source that a reset policy skipped (``on_lost``).

Revision ID: 0003_source_skips
Revises: 0002_job_identity
Create Date: 2026-11-29

* ``skipped_ranges``: one row per range ``[from_offset, to_offset)`` of a partition that a
  source's ``on_lost="earliest"|"latest"`` policy passed over because the broker no longer
  held it (retention, trimming, deleted messages). Written in the batch transaction that
  covers ``from_offset`` (so exactly once and fenced like the batch), read by ``verify``
  ("skipped by policy") and ``status``. Goes with its partition row (cascade).
* ``partitions.source_instance``: which instance of the stream the committed offsets belong
  to (a Kafka topic id, a NATS stream's creation time), recorded by the batch transaction; a
  recreated topic or stream (another instance) is refused even when it has grown past the
  committed offset. NULL before this revision and for sources without an instance id.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_source_skips"
down_revision: str | Sequence[str] | None = "0002_job_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "pgstream"


def upgrade() -> None:
    """Create skipped_ranges and partitions.source_instance."""
    op.add_column(
        "partitions", sa.Column("source_instance", sa.Text(), nullable=True), schema=SCHEMA
    )
    op.create_table(
        "skipped_ranges",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("partition", sa.Text(), nullable=False),
        sa.Column("from_offset", sa.BigInteger(), nullable=False),
        sa.Column("to_offset", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column(
            "skipped_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "job", "source", "partition", "from_offset", name="skipped_ranges_pkey"
        ),
        sa.CheckConstraint("to_offset > from_offset", name="skipped_ranges_nonempty"),
        sa.ForeignKeyConstraint(
            ["job", "source", "partition"],
            [f"{SCHEMA}.partitions.job", f"{SCHEMA}.partitions.source",
             f"{SCHEMA}.partitions.partition"],
            name="skipped_ranges_partition_fkey",
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        schema=SCHEMA,
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("skipped_ranges", schema=SCHEMA)
    op.drop_column("partitions", "source_instance", schema=SCHEMA)

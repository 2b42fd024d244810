"""Initial pgstream schema: partitions, the batch ledger, dead letters, state, workers.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-27

The ledger (``batches``) is a gap-free, non-overlapping chain per partition, enforced by the
schema alone (no extensions such as btree_gist): non-empty ranges, unique start and end
offsets, every batch but the first names its predecessor's end (a self-referencing foreign
key), and at most one first batch per partition (a partial unique index).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "pgstream"


def _now() -> sa.TextClause:
    return sa.text("now()")


def upgrade() -> None:
    """Create the pgstream schema's tables."""
    # env.py has created the schema unless it existed; IF NOT EXISTS alone would still need
    # CREATE on the database when a DBA pre-created the schema for the migration role.
    bind = op.get_bind()
    exists = bind.execute(
        sa.text("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :s)"), {"s": SCHEMA}
    ).scalar()
    if not exists:
        op.execute(sa.text(f'CREATE SCHEMA "{SCHEMA}"'))

    op.create_table(
        "partitions",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("partition", sa.Text(), nullable=False),
        sa.Column("committed_offset", sa.BigInteger(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("owner_backend_pid", sa.Integer(), nullable=True),
        sa.Column("owner_backend_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("watermark", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source_head", sa.BigInteger(), nullable=True),
        sa.Column("last_commit_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("batches", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("records", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("job", "source", "partition", name="partitions_pkey"),
        schema=SCHEMA,
        postgresql_with={"fillfactor": "50"},
    )

    op.create_table(
        "batches",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("partition", sa.Text(), nullable=False),
        sa.Column("start_offset", sa.BigInteger(), nullable=False),
        sa.Column("end_offset", sa.BigInteger(), nullable=False),
        sa.Column("prev_end_offset", sa.BigInteger(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("worker", sa.Text(), nullable=False),
        sa.Column("records_in", sa.Integer(), nullable=False),
        sa.Column("records_out", sa.Integer(), nullable=False),
        sa.Column("dead_letters", sa.Integer(), nullable=False),
        sa.Column(
            "committed_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("job", "source", "partition", "start_offset", name="batches_pkey"),
        sa.UniqueConstraint("job", "source", "partition", "end_offset", name="batches_end_key"),
        sa.CheckConstraint("end_offset > start_offset", name="batches_range_nonempty"),
        sa.CheckConstraint(
            "prev_end_offset IS NULL OR prev_end_offset = start_offset",
            name="batches_chain_contiguous",
        ),
        sa.ForeignKeyConstraint(
            ["job", "source", "partition", "prev_end_offset"],
            [
                f"{SCHEMA}.batches.job",
                f"{SCHEMA}.batches.source",
                f"{SCHEMA}.batches.partition",
                f"{SCHEMA}.batches.end_offset",
            ],
            name="batches_chain_prev_fkey",
        ),
        sa.ForeignKeyConstraint(
            ["job", "source", "partition"],
            [
                f"{SCHEMA}.partitions.job",
                f"{SCHEMA}.partitions.source",
                f"{SCHEMA}.partitions.partition",
            ],
            name="batches_partition_fkey",
            ondelete="CASCADE",
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "batches_one_first_per_partition",
        "batches",
        ["job", "source", "partition"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("prev_end_offset IS NULL"),
    )

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("partition", sa.Text(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("operator", sa.Text(), nullable=True),
        sa.Column("redriven", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job", "source", "partition", "offset", name="dead_letters_record_key"),
        schema=SCHEMA,
    )

    op.create_table(
        "state",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("operator", sa.Text(), nullable=False),
        sa.Column("partition", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("job", "operator", "partition", "key", name="state_pkey"),
        schema=SCHEMA,
        postgresql_with={"fillfactor": "70"},
    )

    op.create_table(
        "workers",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("worker", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("backend_pid", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column(
            "heartbeat_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("job", "worker", name="workers_pkey"),
        schema=SCHEMA,
    )


def downgrade() -> None:
    """Drop the pgstream schema's tables (env.py drops the empty schema at base)."""
    op.drop_table("workers", schema=SCHEMA)
    op.drop_table("state", schema=SCHEMA)
    op.drop_table("dead_letters", schema=SCHEMA)
    op.drop_index("batches_one_first_per_partition", table_name="batches", schema=SCHEMA)
    op.drop_table("batches", schema=SCHEMA)
    op.drop_table("partitions", schema=SCHEMA)

"""Job identity and plan versions; each partition remembers the source it belongs to.

Revision ID: 0002_job_identity
Revises: 0001_initial
Create Date: 2026-11-29

* ``jobs``: one row per job name with the fingerprint and description of the plan it runs
  now (sources, operators, keys, windows, sinks) and its current plan version.
* ``plan_versions``: every plan a job has run under, with the changes accepted at each step,
  so ``verify`` can judge each batch by the plan it ran under.
* ``partitions.source_identity``: what the stream read when its offsets were first committed
  (a table and offset column, a file path, a topic); resuming from another source's offsets
  is refused. NULL for rows created before this revision (adopted on the next start).
* ``batches.plan_version``: the plan version a batch committed under (NULL before this revision).
* ``batches_partition_fkey`` also cascades updates, so renaming a stream or a job moves its
  ledger with its partition rows in one statement.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_job_identity"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "pgstream"


def _now() -> sa.TextClause:
    return sa.text("now()")


def upgrade() -> None:
    """Add jobs, plan_versions and the identity columns."""
    op.create_table(
        "jobs",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("plan", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("job", name="jobs_pkey"),
        schema=SCHEMA,
    )
    op.create_table(
        "plan_versions",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("plan", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("changes", sa.Text(), nullable=True),
        sa.Column("accepted_by", sa.Text(), nullable=True),
        sa.Column(
            "accepted_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("job", "version", name="plan_versions_pkey"),
        sa.ForeignKeyConstraint(
            ["job"],
            [f"{SCHEMA}.jobs.job"],
            name="plan_versions_job_fkey",
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        schema=SCHEMA,
    )
    op.add_column(
        "partitions", sa.Column("source_identity", sa.Text(), nullable=True), schema=SCHEMA
    )
    op.add_column("batches", sa.Column("plan_version", sa.Integer(), nullable=True), schema=SCHEMA)
    op.drop_constraint("batches_partition_fkey", "batches", schema=SCHEMA, type_="foreignkey")
    op.create_foreign_key(
        "batches_partition_fkey",
        "batches",
        "partitions",
        ["job", "source", "partition"],
        ["job", "source", "partition"],
        source_schema=SCHEMA,
        referent_schema=SCHEMA,
        ondelete="CASCADE",
        onupdate="CASCADE",
    )


def downgrade() -> None:
    """Drop them again."""
    op.drop_constraint("batches_partition_fkey", "batches", schema=SCHEMA, type_="foreignkey")
    op.create_foreign_key(
        "batches_partition_fkey",
        "batches",
        "partitions",
        ["job", "source", "partition"],
        ["job", "source", "partition"],
        source_schema=SCHEMA,
        referent_schema=SCHEMA,
        ondelete="CASCADE",
    )
    op.drop_column("batches", "plan_version", schema=SCHEMA)
    op.drop_column("partitions", "source_identity", schema=SCHEMA)
    op.drop_table("plan_versions", schema=SCHEMA)
    op.drop_table("jobs", schema=SCHEMA)

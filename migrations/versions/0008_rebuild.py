"""Rebuilds: which sink tables ``pgstream rebuild`` replaced, under which plan version.

Revision ID: 0008_rebuild
Revises: 0007_redrive
Create Date: 2026-12-07

After ``pgstream rebuild`` swaps a table in, every row of it comes from the plan version the
job ran at the swap, for every committed batch, also the batches the ledger records under
older versions (``rebuild --sink NEW`` gives a new sink its history while the ledger keeps the
batches' own versions). ``pgstream verify`` reads this table to judge such a sink by the
rebuild's version for batches older than it. One row per (job, sink table), replaced by the
next rebuild of the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_rebuild"
down_revision: str | Sequence[str] | None = "0007_redrive"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``pgstream.rebuilds``."""
    op.create_table(
        "rebuilds",
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("sink", sa.Text(), nullable=False),
        sa.Column("plan_version", sa.Integer(), nullable=False),
        sa.Column(
            "rebuilt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("job", "sink", name="rebuilds_pkey"),
        schema="pgstream",
    )


def downgrade() -> None:
    """Drop it."""
    op.drop_table("rebuilds", schema="pgstream")

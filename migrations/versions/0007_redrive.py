"""Dead-letter redrive: when and how each dead letter was re-run.

Revision ID: 0007_redrive
Revises: 0006_repartition
Create Date: 2026-11-29

``pgstream dlq redrive`` re-runs dead letters through today's code. The existing
``redriven`` flag (read by the status views: ``dead_letters_open`` counts the rows not
redriven) turns true in the transaction that writes the record's effect; these columns keep
the story:

* ``redriven_at``: when the effect was written;
* ``redrive_outcome``: what it wrote (e.g. ``"2 rows"``, ``"no output"``);
* ``redrive_attempts``: redrives tried so far (a failed one leaves the row open);
* ``redrive_error``: the latest redrive's error, NULL once redriven (``error`` keeps the
  original one).

No view changes: the views read only ``redriven``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_redrive"
down_revision: str | Sequence[str] | None = "0006_repartition"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the redrive columns."""
    op.add_column(
        "dead_letters",
        sa.Column("redriven_at", sa.DateTime(timezone=True), nullable=True),
        schema="pgstream",
    )
    op.add_column(
        "dead_letters", sa.Column("redrive_outcome", sa.Text(), nullable=True), schema="pgstream"
    )
    op.add_column(
        "dead_letters",
        sa.Column("redrive_attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        schema="pgstream",
    )
    op.add_column(
        "dead_letters", sa.Column("redrive_error", sa.Text(), nullable=True), schema="pgstream"
    )


def downgrade() -> None:
    """Drop them."""
    for name in ("redrive_error", "redrive_attempts", "redrive_outcome", "redriven_at"):
        op.drop_column("dead_letters", name, schema="pgstream")

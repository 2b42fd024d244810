"""Event time: per-operator watermarks in the partition row, late records, watermark views.

Revision ID: 0004_event_time
Revises: 0003_source_skips
Create Date: 2026-11-29

* ``partitions.watermarks``: per window operator (``window:<table>``) the partition's
  watermark in epoch seconds, written in the batch transaction; ``partitions.watermark`` (from
  0001) now holds the least of them.
* ``late_records``: records whose window had closed (its end + grace before the watermark),
  one row per (record output, window), written in the batch transaction.
* views ``window_watermarks`` (per partition and operator) and ``job_watermarks`` (per job and
  operator: the least over the partitions feeding it, idle ones left out).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_event_time"
down_revision: str | Sequence[str] | None = "0003_source_skips"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "pgstream"

WINDOW_WATERMARKS_VIEW = """
CREATE VIEW pgstream.window_watermarks AS
SELECT p.job, p.source, p.partition, w.key AS operator,
       to_timestamp(w.value::float8) AS watermark, p.last_commit_at
  FROM pgstream.partitions p, jsonb_each_text(p.watermarks) w
"""

JOB_WATERMARKS_VIEW = """
CREATE VIEW pgstream.job_watermarks AS
WITH ops AS (
    SELECT j.job, 'window:' || (s ->> 'table') AS operator, s ->> 'stream' AS source,
           (s -> 'key' -> 'window' ->> 'idle_timeout')::float8 AS idle_timeout
      FROM pgstream.jobs j, jsonb_array_elements(j.plan -> 'sinks') s
     WHERE s -> 'key' -> 'window' ? 'grace'
), marks AS (
    SELECT o.job, o.operator, (p.watermarks ->> o.operator)::float8 AS mark,
           coalesce(o.idle_timeout IS NOT NULL
                    AND coalesce(p.last_commit_at, p.created_at)
                        < now() - make_interval(secs => o.idle_timeout), false) AS idle
      FROM ops o JOIN pgstream.partitions p ON p.job = o.job AND p.source = o.source
)
SELECT job, operator,
       CASE WHEN bool_and(idle) THEN to_timestamp(max(mark))
            WHEN bool_or(mark IS NULL AND NOT idle) THEN NULL
            ELSE to_timestamp(min(mark) FILTER (WHERE NOT idle)) END AS watermark,
       count(*) AS partitions,
       count(*) FILTER (WHERE idle) AS idle_partitions
  FROM marks GROUP BY job, operator
"""


def _now() -> sa.TextClause:
    return sa.text("now()")


def upgrade() -> None:
    """Add the watermarks column, late_records and the views."""
    op.add_column(
        "partitions",
        sa.Column("watermarks", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        schema=SCHEMA,
    )
    op.create_table(
        "late_records",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("operator", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("partition", sa.Text(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("watermark", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "job",
            "operator",
            "source",
            "partition",
            "offset",
            "seq",
            "window_start",
            name="late_records_record_key",
        ),
        schema=SCHEMA,
    )
    op.execute(WINDOW_WATERMARKS_VIEW)
    op.execute(JOB_WATERMARKS_VIEW)


def downgrade() -> None:
    """Drop them again."""
    op.execute("DROP VIEW IF EXISTS pgstream.job_watermarks")
    op.execute("DROP VIEW IF EXISTS pgstream.window_watermarks")
    op.drop_table("late_records", schema=SCHEMA)
    op.drop_column("partitions", "watermarks", schema=SCHEMA)

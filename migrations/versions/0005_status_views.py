"""Status views: ``pgstream.partition_status`` and ``pgstream.job_status``.

Revision ID: 0005_status_views
Revises: 0004_event_time
Create Date: 2026-11-29

What ``pgstream status`` shows, as views a DBA can query in psql:

* ``partition_status``: one row per (job, source, partition): committed offset, source head,
  lag, last commit time and age, owner (while its lease is live), lease expiry, epoch,
  batches, records, dead letters (all, and those not redriven), watermark, attempts.
* ``job_status``: one row per job: plan version, partitions, owned partitions, owners,
  records, batches, lag, dead letters, last commit, watermark (the smallest partition's).

The SQL is a copy of ``pgstream.db.tables.VIEWS`` as of this revision (a migration never
changes with later code; a test compares the two as the server stores them).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_status_views"
down_revision: str | Sequence[str] | None = "0004_event_time"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTITION_STATUS = """
SELECT p.job,
       p.source,
       p.partition,
       p.committed_offset,
       p.source_head,
       GREATEST(p.source_head - p.committed_offset, 0) AS lag,
       p.last_commit_at,
       now() - p.last_commit_at AS last_commit_age,
       CASE WHEN p.lease_expires_at > now() THEN p.owner END AS owner,
       COALESCE(p.lease_expires_at > now(), false) AS leased,
       p.lease_expires_at,
       p.epoch,
       p.batches,
       p.records,
       d.dead_letters,
       d.dead_letters_open,
       p.watermark,
       p.attempts
  FROM pgstream.partitions AS p
  CROSS JOIN LATERAL (
        SELECT count(*) AS dead_letters,
               count(*) FILTER (WHERE NOT dl.redriven) AS dead_letters_open
          FROM pgstream.dead_letters AS dl
         WHERE dl.job = p.job AND dl.source = p.source AND dl.partition = p.partition
       ) AS d
"""

JOB_STATUS = """
SELECT s.job,
       j.version AS plan_version,
       count(*) AS partitions,
       count(*) FILTER (WHERE s.leased) AS owned_partitions,
       count(DISTINCT s.owner) AS owners,
       sum(s.records)::bigint AS records,
       sum(s.batches)::bigint AS batches,
       sum(s.lag)::bigint AS lag,
       sum(s.dead_letters)::bigint AS dead_letters,
       sum(s.dead_letters_open)::bigint AS dead_letters_open,
       max(s.last_commit_at) AS last_commit_at,
       now() - max(s.last_commit_at) AS last_commit_age,
       min(s.watermark) AS watermark
  FROM pgstream.partition_status AS s
  LEFT JOIN pgstream.jobs AS j ON j.job = s.job
 GROUP BY s.job, j.version
"""


def upgrade() -> None:
    """Create the views."""
    op.execute(f"CREATE VIEW pgstream.partition_status AS {PARTITION_STATUS}")
    op.execute(f"CREATE VIEW pgstream.job_status AS {JOB_STATUS}")


def downgrade() -> None:
    """Drop them."""
    op.execute("DROP VIEW IF EXISTS pgstream.job_status")
    op.execute("DROP VIEW IF EXISTS pgstream.partition_status")

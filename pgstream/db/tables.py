"""SQLAlchemy Core definitions of pgstream's own schema.

These definitions are the single source of truth: the Alembic migrations in ``migrations/``
must produce exactly these tables (a test compares them), and the runtime's SQL refers to
the same names.
"""

from __future__ import annotations

from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from pgstream.db.queries import SCHEMA as SCHEMA  # its home is queries; kept here too

metadata = MetaData(schema=SCHEMA)

# One row per (job, source, partition): the checkpoint itself plus the lease.
# committed_offset is the exclusive end of everything applied (NULL = nothing yet).
# fillfactor leaves room for HOT updates: this row is rewritten by every batch.
partitions = Table(
    "partitions",
    metadata,
    Column("job", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("partition", Text, nullable=False),
    Column("committed_offset", BigInteger, nullable=True),
    Column("epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("owner", Text, nullable=True),
    Column("owner_backend_pid", Integer, nullable=True),
    Column("owner_backend_start", DateTime(timezone=True), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("watermark", DateTime(timezone=True), nullable=True),
    Column("source_head", BigInteger, nullable=True),
    Column("last_commit_at", DateTime(timezone=True), nullable=True),
    Column("batches", BigInteger, nullable=False, server_default=text("0")),
    Column("records", BigInteger, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # what the stream read when this row was created (Source.identity); NULL before 0002
    Column("source_identity", Text, nullable=True),
    # which instance of the stream the committed offsets belong to (a Kafka topic id, a NATS
    # stream's creation time; PartitionReader.instance), set by the first batch; NULL before
    # 0003 or for sources without one. A reader that finds another instance stops the job.
    Column("source_instance", Text, nullable=True),
    # per window operator ("window:<table>"), its watermark in epoch seconds (0004); the
    # watermark column above is the least of them
    Column("watermarks", JSONB, nullable=True),
    PrimaryKeyConstraint("job", "source", "partition", name="partitions_pkey"),
    postgresql_with={"fillfactor": "50"},
)

# The batch ledger. Each row covers [start_offset, end_offset) of one partition.
# The schema makes the ledger a gap-free, non-overlapping chain:
#   * end_offset > start_offset;
#   * start_offset and end_offset are each unique per partition;
#   * every batch but the first names its predecessor's end (prev_end_offset = start_offset,
#     a foreign key onto an existing batch's end_offset);
#   * at most one batch per partition has no predecessor.
batches = Table(
    "batches",
    metadata,
    Column("job", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("partition", Text, nullable=False),
    Column("start_offset", BigInteger, nullable=False),
    Column("end_offset", BigInteger, nullable=False),
    Column("prev_end_offset", BigInteger, nullable=True),
    Column("epoch", BigInteger, nullable=False),
    Column("worker", Text, nullable=False),
    Column("records_in", Integer, nullable=False),
    Column("records_out", Integer, nullable=False),
    Column("dead_letters", Integer, nullable=False),
    Column("committed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # the job's plan version this batch ran under (pgstream.plan_versions); NULL before 0002
    Column("plan_version", Integer, nullable=True),
    PrimaryKeyConstraint("job", "source", "partition", "start_offset", name="batches_pkey"),
    UniqueConstraint("job", "source", "partition", "end_offset", name="batches_end_key"),
    CheckConstraint("end_offset > start_offset", name="batches_range_nonempty"),
    CheckConstraint(
        "prev_end_offset IS NULL OR prev_end_offset = start_offset",
        name="batches_chain_contiguous",
    ),
    ForeignKeyConstraint(
        ["job", "source", "partition", "prev_end_offset"],
        [
            "pgstream.batches.job",
            "pgstream.batches.source",
            "pgstream.batches.partition",
            "pgstream.batches.end_offset",
        ],
        name="batches_chain_prev_fkey",
    ),
    ForeignKeyConstraint(
        ["job", "source", "partition"],
        ["pgstream.partitions.job", "pgstream.partitions.source", "pgstream.partitions.partition"],
        name="batches_partition_fkey",
        ondelete="CASCADE",
        onupdate="CASCADE",
    ),
)

Index(
    "batches_one_first_per_partition",
    batches.c.job,
    batches.c.source,
    batches.c.partition,
    unique=True,
    postgresql_where=batches.c.prev_end_offset.is_(None),
)

# Records that could not be decoded or whose operators raised, with the error text.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("partition", Text, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=True),
    Column("error", Text, nullable=False),
    Column("operator", Text, nullable=True),
    Column("redriven", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # `pgstream dlq redrive` (revision 0007): when the record's effect was written and what
    # it wrote; redrives tried and the latest one's error while it stays open
    Column("redriven_at", DateTime(timezone=True), nullable=True),
    Column("redrive_outcome", Text, nullable=True),
    Column("redrive_attempts", Integer, nullable=False, server_default=text("0")),
    Column("redrive_error", Text, nullable=True),
    UniqueConstraint("job", "source", "partition", "offset", name="dead_letters_record_key"),
)

# Keyed operator state (fold): one JSON value per (job, operator, partition, key).
state = Table(
    "state",
    metadata,
    Column("job", Text, nullable=False),
    Column("operator", Text, nullable=False),
    Column("partition", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("value", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job", "operator", "partition", "key", name="state_pkey"),
    postgresql_with={"fillfactor": "70"},
)

# One row per job: the plan it runs now (a JSON description and its fingerprint) and the
# current plan version. Every version, with the changes accepted at each step, is kept in
# plan_versions, so verify can judge each batch by the plan it ran under.
jobs = Table(
    "jobs",
    metadata,
    Column("job", Text, nullable=False),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("fingerprint", Text, nullable=False),
    Column("plan", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job", name="jobs_pkey"),
)

plan_versions = Table(
    "plan_versions",
    metadata,
    Column("job", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("fingerprint", Text, nullable=False),
    Column("plan", JSONB, nullable=False),
    Column("changes", Text, nullable=True),
    Column("accepted_by", Text, nullable=True),
    Column("accepted_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job", "version", name="plan_versions_pkey"),
    ForeignKeyConstraint(
        ["job"],
        ["pgstream.jobs.job"],
        name="plan_versions_job_fkey",
        ondelete="CASCADE",
        onupdate="CASCADE",
    ),
)

# Live workers of a job (heartbeats), used to share partitions fairly.
workers = Table(
    "workers",
    metadata,
    Column("job", Text, nullable=False),
    Column("worker", Text, nullable=False),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("backend_pid", Integer, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job", "worker", name="workers_pkey"),
)


# Ranges [from_offset, to_offset) of a partition that a source's reset policy (on_lost)
# skipped because the broker no longer held them; written in the batch transaction that
# covers from_offset, reported by verify ("skipped by policy") and status.
skipped_ranges = Table(
    "skipped_ranges",
    metadata,
    Column("job", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("partition", Text, nullable=False),
    Column("from_offset", BigInteger, nullable=False),
    Column("to_offset", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=True),
    Column("policy", Text, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("skipped_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job", "source", "partition", "from_offset", name="skipped_ranges_pkey"),
    CheckConstraint("to_offset > from_offset", name="skipped_ranges_nonempty"),
    ForeignKeyConstraint(
        ["job", "source", "partition"],
        ["pgstream.partitions.job", "pgstream.partitions.source", "pgstream.partitions.partition"],
        name="skipped_ranges_partition_fkey",
        ondelete="CASCADE",
        onupdate="CASCADE",
    ),
)

# -- views: what `pgstream status` shows, for psql and dashboards (revision 0005) -------------
# Definitions here and in the migration must stay equal (a test compares them as the server
# stores them). Later revisions add columns at the end (CREATE OR REPLACE VIEW keeps the
# existing ones).

# One row per (job, source, partition): progress, lag, lease and dead letters. ``owner`` is
# NULL unless its lease is live; ``lag`` is NULL until both the head and an offset are known.
PARTITION_STATUS_VIEW = """
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

# One row per job: its partitions summed up (the watermark is the smallest partition's).
JOB_STATUS_VIEW = """
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

# Sink tables that `pgstream rebuild` replaced (revision 0008): every row of the table comes
# from ``plan_version``, also for the batches the ledger records under older versions; verify
# judges the sink by this version for them. One row per (job, sink table).
rebuilds = Table(
    "rebuilds",
    metadata,
    Column("job", Text, nullable=False),
    Column("sink", Text, nullable=False),
    Column("plan_version", Integer, nullable=False),
    Column("rebuilt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job", "sink", name="rebuilds_pkey"),
)

# Records that came too late for their window (its end + grace before the partition's
# watermark): kept here instead of applied, one row per (record output, window).
late_records = Table(
    "late_records",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job", Text, nullable=False),
    Column("operator", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("partition", Text, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("window_end", DateTime(timezone=True), nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("watermark", DateTime(timezone=True), nullable=False),
    Column("payload", JSONB, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint(
        "job",
        "operator",
        "source",
        "partition",
        "offset",
        "seq",
        "window_start",
        name="late_records_record_key",
    ),
)

#: each partition's watermark per window operator, as timestamps
WINDOW_WATERMARKS_VIEW = """
SELECT p.job, p.source, p.partition, w.key AS operator,
       to_timestamp(w.value::float8) AS watermark, p.last_commit_at
  FROM pgstream.partitions p, jsonb_each_text(p.watermarks) w
"""

#: a job's watermark per window operator with a grace (the only ones that track one): the least
#: over the partitions of the streams that feed it (one that has none yet holds it at NULL),
#: leaving out partitions idle (no commit) for longer than the window's idle_timeout (from
#: the job's plan); when all are idle, the largest of theirs
JOB_WATERMARKS_VIEW = """
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


#: the views in creation order (each may read the ones before it)
VIEWS: dict[str, str] = {
    "window_watermarks": WINDOW_WATERMARKS_VIEW,  # revision 0004
    "job_watermarks": JOB_WATERMARKS_VIEW,
    "partition_status": PARTITION_STATUS_VIEW,  # revision 0005
    "job_status": JOB_STATUS_VIEW,
}

for _name, _body in VIEWS.items():
    event.listen(metadata, "after_create", DDL(f"CREATE VIEW {SCHEMA}.{_name} AS {_body}"))  # type: ignore[no-untyped-call]
for _name in reversed(VIEWS):
    event.listen(metadata, "before_drop", DDL(f"DROP VIEW IF EXISTS {SCHEMA}.{_name}"))  # type: ignore[no-untyped-call]

# Keyed records handed from a repartition's first stage to its second (see
# pgstream.runtime.repartition). ``id`` is the second stage's offset (read below the safe
# horizon, like a table source); ``rpart`` the repartition partition, a stable hash of ``key``;
# the upstream position is unique per stream, so a record is never handed over twice.
repartition = Table(
    "repartition",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job", Text, nullable=False),
    Column("stream", Text, nullable=False),
    Column("rpart", Integer, nullable=False),
    Column("key", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("src_source", Text, nullable=False),
    Column("src_partition", Text, nullable=False),
    Column("src_offset", BigInteger, nullable=False),
    Column("src_seq", Integer, nullable=False),
    UniqueConstraint(
        "job",
        "stream",
        "src_partition",
        "src_offset",
        "src_seq",
        name="repartition_position_key",
    ),
)

Index(
    "repartition_read_idx",
    repartition.c.job,
    repartition.c.stream,
    repartition.c.rpart,
    repartition.c.id,
)

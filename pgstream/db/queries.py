"""SQL for pgstream's own schema: partitions (checkpoint + lease), jobs and plan versions,
ledger, dead letters, state, workers and Alembic's version table.

Every statement pgstream sends to the ``pgstream`` schema lives here as a named constant,
grouped by concern (one ``# --`` section each), so a schema change touches this one file:
the runtime's (leases, job check, the batch transaction, state, workers), the commands'
(``status``, ``job``, ``demo``, ``db grant``) and the start-up checks (privileges, migrations).
Statements that take an identifier are :class:`psycopg.sql.SQL` templates formatted with
:class:`psycopg.sql.Identifier`; values are always parameters. Statements about the user's own
tables (sources, sinks) stay with the source and sink code, except ``pgstream job``'s changes
to the ``_source`` column of append sinks (job administration section).
``tests/unit/test_queries_home.py`` fails when a statement against the ``pgstream`` schema
appears elsewhere in the package.
"""

from __future__ import annotations

from psycopg import sql

#: pgstream's own schema (its tables: :mod:`pgstream.db.tables`)
SCHEMA = "pgstream"

# -- partitions: registration, leases ---------------------------------------------------------

# Rows that exist are skipped before the insert: ON CONFLICT alone would wait for the row
# lock of an owner's open batch transaction (forever, if that owner is frozen).
# A new row is stamped with the identity of the source its offsets belong to, as recorded
# in the job's plan (the start-up check records the plan before it registers partitions).
REGISTER_PARTITIONS = """
INSERT INTO pgstream.partitions (job, source, partition, source_identity)
SELECT %(job)s, %(source)s, p,
       (SELECT j.plan -> 'streams' -> %(source)s ->> 'source' FROM pgstream.jobs j
         WHERE j.job = %(job)s)
  FROM unnest(%(partitions)s::text[]) AS p
 WHERE NOT EXISTS (SELECT 1 FROM pgstream.partitions q
                    WHERE q.job = %(job)s AND q.source = %(source)s AND q.partition = p)
ON CONFLICT (job, source, partition) DO NOTHING
"""

# The owner's session is provably gone when no backend with its pid and start time exists.
# Unprivileged roles see NULL backend_start for other roles' sessions: then the pid alone
# keeps the lease alive (safe: we just wait for expiry).
_OWNER_GONE = """
  p.owner IS NULL
  OR p.lease_expires_at < now()
  OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.pid = p.owner_backend_pid
                    AND (a.backend_start IS NULL OR a.backend_start = p.owner_backend_start))
"""

# Takeover: bump the epoch in its own transaction. Every later batch of the previous
# owner fails its compare-and-set on the epoch. ``prev`` locks the row first and keeps its
# owner as it was (NULL: released or fenced; a name: that worker's lease expired or its
# session is gone, so this claim is a takeover).
CLAIM = f"""
WITH prev AS (
  SELECT p.owner FROM pgstream.partitions AS p
   WHERE p.job = %(job)s AND p.source = %(source)s AND p.partition = %(partition)s
     AND ({_OWNER_GONE})
     FOR UPDATE OF p
)
UPDATE pgstream.partitions AS p
   SET epoch = p.epoch + 1,
       owner = %(worker)s,
       owner_backend_pid = pg_backend_pid(),
       owner_backend_start = (SELECT backend_start FROM pg_stat_activity
                               WHERE pid = pg_backend_pid()),
       lease_expires_at = now() + make_interval(secs => %(lease)s)
  FROM prev
 WHERE p.job = %(job)s AND p.source = %(source)s AND p.partition = %(partition)s
   AND ({_OWNER_GONE})
RETURNING p.epoch, p.committed_offset, p.attempts, p.source_instance, prev.owner
"""

# A claim waits this long at most for a partition row locked by a batch in flight.
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %(ms)s, true)"

# A stuck owner: its lease has expired (as committed) and its session has held one
# transaction open for longer than a lease -- frozen inside its batch (SIGSTOP, a VM pause),
# possibly in a COPY whose data never comes, which no server timeout ends. Its transaction
# keeps the partition row locked, so a claim would wait for it indefinitely: end the session
# (its batch rolls back; the epoch bump of the claim fences it if it ever resumes).
TERMINATE_STUCK_OWNERS = """
SELECT p.source, p.partition, a.pid, pg_terminate_backend(a.pid)
  FROM pgstream.partitions AS p
  JOIN pg_stat_activity AS a
    ON a.pid = p.owner_backend_pid AND a.backend_start = p.owner_backend_start
 WHERE p.job = %(job)s AND p.owner IS DISTINCT FROM %(worker)s
   AND p.lease_expires_at < now()
   AND a.xact_start < now() - make_interval(secs => %(lease)s)
"""

# %(streams)s: the app's streams (NULL: every stream of the job).
_ANY_STREAM = "%(streams)s::text[] IS NULL OR p.source = ANY(%(streams)s::text[])"

# Only the app's own streams: rows of a stream removed from the code (orphans, see
# ORPHAN_STREAMS) are never claimed, so they must not count as claimable either.
CLAIMABLE = f"""
SELECT p.source, p.partition FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND ({_ANY_STREAM}) AND ({_OWNER_GONE})
 ORDER BY p.source, p.partition
"""

RENEW = """
UPDATE pgstream.partitions
   SET lease_expires_at = now() + make_interval(secs => %(lease)s),
       owner_backend_pid = pg_backend_pid(),
       owner_backend_start = (SELECT backend_start FROM pg_stat_activity
                               WHERE pid = pg_backend_pid())
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND epoch = %(epoch)s
RETURNING 1
"""

RELEASE = """
UPDATE pgstream.partitions
   SET owner = NULL, owner_backend_pid = NULL, owner_backend_start = NULL,
       lease_expires_at = NULL
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND epoch = %(epoch)s
"""

READ_PARTITION = """
SELECT committed_offset, epoch FROM pgstream.partitions
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
"""

COUNT_PARTITIONS = f"""
SELECT count(*) FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND ({_ANY_STREAM})
"""

# Streams with partition rows in this job that the app no longer has (removed from the code).
ORPHAN_STREAMS = """
SELECT DISTINCT source FROM pgstream.partitions
 WHERE job = %(job)s AND NOT (source = ANY(%(streams)s::text[]))
 ORDER BY source
"""

# Attempts are counted outside the batch transaction (asynchronously committed: a crashed
# worker process does not lose it, only a crashed server might) so a record that kills the
# process is noticed even though its batch never commits.
BUMP_ATTEMPTS = """
UPDATE pgstream.partitions SET attempts = attempts + 1
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND epoch = %(epoch)s
RETURNING attempts
"""

# A poll that failed with an error this worker survived (it retries or reports it) was no
# death: take its attempt back, so that only polls whose process vanished add up.
FORGIVE_ATTEMPT = """
UPDATE pgstream.partitions SET attempts = GREATEST(attempts - 1, 0)
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND epoch = %(epoch)s
"""

# -- job identity and plan versions (pgstream.runtime.jobcheck) ------------------------------

# Serializes the start-up checks of one job's workers (transaction-level: released at the
# end of the check's transaction), so N workers starting at once record one plan version.
LOCK_JOB = "SELECT pg_advisory_xact_lock(hashtext('pgstream.jobs'), hashtext(%(job)s))"

LOAD_JOB = """
SELECT version, fingerprint, plan FROM pgstream.jobs WHERE job = %(job)s FOR UPDATE
"""

JOB_VERSION = "SELECT version FROM pgstream.jobs WHERE job = %(job)s"

INSERT_JOB = """
INSERT INTO pgstream.jobs (job, version, fingerprint, plan)
VALUES (%(job)s, %(version)s, %(fingerprint)s, %(plan)s)
"""

UPDATE_JOB = """
UPDATE pgstream.jobs
   SET version = %(version)s, fingerprint = %(fingerprint)s, plan = %(plan)s, updated_at = now()
 WHERE job = %(job)s
"""

INSERT_PLAN_VERSION = """
INSERT INTO pgstream.plan_versions (job, version, fingerprint, plan, changes, accepted_by)
VALUES (%(job)s, %(version)s, %(fingerprint)s, %(plan)s, %(changes)s, %(accepted_by)s)
"""

# The newest earlier version with this fingerprint (a worker still running old code).
FIND_PLAN_VERSION = """
SELECT version, accepted_at FROM pgstream.plan_versions
 WHERE job = %(job)s AND fingerprint = %(fingerprint)s
 ORDER BY version DESC LIMIT 1
"""

PLAN_VERSIONS = """
SELECT version, plan, changes FROM pgstream.plan_versions WHERE job = %(job)s ORDER BY version
"""

OTHER_JOBS = "SELECT job, plan FROM pgstream.jobs WHERE job <> %(job)s ORDER BY job"

PARTITION_IDENTITIES = """
SELECT source, partition, source_identity, committed_offset FROM pgstream.partitions
 WHERE job = %(job)s ORDER BY source, partition
"""

# Rows registered before revision 0002 have no identity: they adopt the app's.
ADOPT_SOURCE_IDENTITY = """
UPDATE pgstream.partitions SET source_identity = %(identity)s
 WHERE job = %(job)s AND source = %(source)s AND source_identity IS NULL
"""

# Accepting a new plan fences every worker of the job: the epoch bump fails their next
# compare-and-set, and the leases are freed so workers running the new plan claim at once.
FENCE_JOB = """
UPDATE pgstream.partitions
   SET epoch = epoch + 1, owner = NULL, owner_backend_pid = NULL, owner_backend_start = NULL,
       lease_expires_at = NULL
 WHERE job = %(job)s
"""

# -- the batch transaction --------------------------------------------------------------------

# 1. fence + claim: the first statement of every batch transaction. A worker whose plan
# version is no longer the job's (a newer plan was accepted) cannot commit either.
CHECKPOINT = """
UPDATE pgstream.partitions
   SET committed_offset = %(end)s,
       lease_expires_at = now() + make_interval(secs => %(lease)s),
       last_commit_at = now(),
       source_head = %(head)s,
       batches = batches + 1,
       records = records + %(records)s,
       attempts = 0,
       source_instance = COALESCE(%(instance)s, source_instance)
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND epoch = %(epoch)s AND committed_offset IS NOT DISTINCT FROM %(start)s
   AND EXISTS (SELECT 1 FROM pgstream.jobs j
                WHERE j.job = %(job)s AND j.version = %(plan_version)s)
RETURNING 1
"""

# 5. the ledger row. prev_end_offset is NULL only for a partition's first batch.
LEDGER = """
INSERT INTO pgstream.batches (job, source, partition, start_offset, end_offset,
                              prev_end_offset, epoch, worker, records_in, records_out,
                              dead_letters, plan_version)
VALUES (%(job)s, %(source)s, %(partition)s, %(start_offset)s, %(end)s, %(start)s,
        %(epoch)s, %(worker)s, %(records_in)s, %(records_out)s, %(dead_letters)s,
        %(plan_version)s)
"""

# 5b. a range a source's reset policy skipped (on_lost), recorded once: a range an earlier
# row already covers (a restart found the same loss again) is not recorded twice.
RECORD_SKIP = """
INSERT INTO pgstream.skipped_ranges (job, source, partition, from_offset, to_offset, reason,
                                     detail, policy, epoch)
SELECT %(job)s, %(source)s, %(partition)s, %(from)s, %(to)s, %(reason)s, %(detail)s,
       %(policy)s, %(epoch)s
 WHERE NOT EXISTS (SELECT 1 FROM pgstream.skipped_ranges s
                    WHERE s.job = %(job)s AND s.source = %(source)s
                      AND s.partition = %(partition)s
                      AND s.from_offset <= %(from)s AND s.to_offset >= %(to)s)
ON CONFLICT (job, source, partition, from_offset) DO NOTHING
"""

COPY_DEAD_LETTERS = """
COPY pgstream.dead_letters (job, source, partition, "offset", payload, error, operator)
FROM STDIN
"""

# -- keyed state (fold) -----------------------------------------------------------------------

LOAD_STATE = """
SELECT key, value::text FROM pgstream.state
 WHERE job = %(job)s AND operator = %(operator)s AND partition = %(partition)s
"""

# Emitted windows (emit="final") leave the state in the batch that writes their rows.
DELETE_STATE_KEYS = """
DELETE FROM pgstream.state
 WHERE job = %(job)s AND operator = %(operator)s AND partition = %(partition)s
   AND key = ANY(%(keys)s::text[])
"""

# -- event time: watermarks and late records (revision 0004_event_time) -----------------------

# A window operator's watermark for one partition (epoch seconds), reloaded on takeover.
LOAD_WATERMARK = """
SELECT (watermarks ->> %(operator)s)::float8 FROM pgstream.partitions
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
"""

# Inside the batch transaction, after its fence (the row is already locked by it): the
# operator's new watermark, and the partition's watermark column = the least over its window
# operators.
SAVE_WATERMARK = """
UPDATE pgstream.partitions p
   SET watermarks = m.marks,
       watermark = (SELECT to_timestamp(min(e.value::float8)) FROM jsonb_each_text(m.marks) e)
  FROM (SELECT coalesce(q.watermarks, '{}'::jsonb) || %(marks)s::jsonb AS marks
          FROM pgstream.partitions q
         WHERE q.job = %(job)s AND q.source = %(source)s AND q.partition = %(partition)s) m
 WHERE p.job = %(job)s AND p.source = %(source)s AND p.partition = %(partition)s
"""

COPY_LATE_RECORDS = """
COPY pgstream.late_records (job, operator, source, partition, "offset", seq, window_start,
                            window_end, event_time, watermark, payload)
FROM STDIN
"""

# verify: the late records of a job
VERIFY_LATE_RECORDS = """
SELECT operator, source, partition, "offset", seq, window_start, event_time, watermark
  FROM pgstream.late_records WHERE job = %(job)s
"""

# Touched keys are COPYed into a session temp table, then moved into pgstream.state in one
# statement that also empties the stage (several fold operators share it in one batch).
STAGE_STATE = """
CREATE TEMP TABLE IF NOT EXISTS pgstream_state_stage (key text, value jsonb)
ON COMMIT DELETE ROWS
"""

COPY_STATE_STAGE = "COPY pgstream_state_stage (key, value) FROM STDIN"

UPSERT_STATE = """
WITH staged AS (DELETE FROM pgstream_state_stage RETURNING key, value)
INSERT INTO pgstream.state (job, operator, partition, key, value)
SELECT %(job)s, %(operator)s, %(partition)s, key, value
  FROM staged ORDER BY key
ON CONFLICT (job, operator, partition, key)
DO UPDATE SET value = EXCLUDED.value, updated_at = now()
"""

# -- repartition: keyed records handed from a first stage to a second ------------------------

#: the first stage's rows, in its batch transaction (the partition's compare-and-set fences it)
COPY_REPARTITION = """
COPY pgstream.repartition
     (job, stream, rpart, key, payload, src_source, src_partition, src_offset, src_seq)
FROM STDIN
"""

#: after rewound offsets: rows at positions handed over already are left as they are
INSERT_REPARTITION_IGNORING_DUPLICATES = """
INSERT INTO pgstream.repartition
       (job, stream, rpart, key, payload, src_source, src_partition, src_offset, src_seq)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (job, stream, src_partition, src_offset, src_seq) DO NOTHING
"""

#: retention: rows of a second-stage partition below its committed offset (consumed)
PRUNE_REPARTITION = """
DELETE FROM pgstream.repartition r
 USING pgstream.partitions p
 WHERE p.job = %(job)s AND p.source = %(stream)s AND p.partition = %(partition)s
   AND r.job = p.job AND r.stream = p.source AND r.rpart = p.partition::int
   AND r.id < p.committed_offset
"""

#: idle check: rows of a second-stage partition at or above its position (not folded yet)
REPARTITION_PENDING = """
SELECT EXISTS (SELECT 1 FROM pgstream.repartition
                WHERE job = %(job)s AND stream = %(stream)s AND rpart = %(rpart)s
                  AND id >= %(position)s)
"""

#: verify: every row one repartition holds, by upstream position
REPARTITION_ROWS = """
SELECT src_partition, src_offset, src_seq, rpart, key, payload::text
  FROM pgstream.repartition
 WHERE job = %(job)s AND stream = %(stream)s AND src_source = %(source)s
"""

#: status: per repartition partition, the upstream streams, rows handed over, rows not yet
#: consumed by the fold (at or above its committed offset)
REPARTITION_BACKLOG = """
SELECT r.job, r.stream, r.rpart::text, array_agg(DISTINCT r.src_source), count(*),
       count(*) FILTER (WHERE p.committed_offset IS NULL OR r.id >= p.committed_offset)
  FROM pgstream.repartition r
  LEFT JOIN pgstream.partitions p
    ON p.job = r.job AND p.source = r.stream AND p.partition = r.rpart::text
 WHERE %(job)s::text IS NULL OR r.job = %(job)s
 GROUP BY r.job, r.stream, r.rpart
"""

# -- workers ----------------------------------------------------------------------------------

HEARTBEAT = """
INSERT INTO pgstream.workers (job, worker, hostname, pid, backend_pid)
VALUES (%(job)s, %(worker)s, %(hostname)s, %(pid)s, pg_backend_pid())
ON CONFLICT (job, worker) DO UPDATE SET heartbeat_at = now(), backend_pid = pg_backend_pid()
"""

# A worker counts as live while its heartbeat is fresh and its session exists: a worker
# killed with -9 stops counting at once, so the survivors' fair share covers its partitions.
# Listed in the order every worker of the group agrees on: the ones owning most partitions of
# the app's streams first, then the oldest, then by id. The first ``partitions % workers`` of
# them own one partition more than the others, so the extra ones stay where they are (a
# worker that resumes after a freeze does not get its partitions handed back).
LIVE_WORKER_IDS = f"""
SELECT w.worker FROM pgstream.workers w
 WHERE w.job = %(job)s AND w.heartbeat_at > now() - make_interval(secs => %(lease)s)
   AND (w.worker = %(worker)s
        OR w.backend_pid IS NULL
        OR EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.backend_pid))
 ORDER BY (SELECT count(*) FROM pgstream.partitions AS p
            WHERE p.job = %(job)s AND ({_ANY_STREAM}) AND p.owner = w.worker) DESC,
          w.started_at, w.worker
"""

FORGET_WORKER = "DELETE FROM pgstream.workers WHERE job = %(job)s AND worker = %(worker)s"

PRUNE_WORKERS = """
DELETE FROM pgstream.workers
 WHERE job = %(job)s AND heartbeat_at < now() - make_interval(secs => 10 * %(lease)s)
"""

# -- group changes (pgstream.runtime.group) ---------------------------------------------------

# Workers of a job tell each other at once when they join, give partitions up or leave, so
# owners re-check their share after their batch in flight instead of at their next lease
# renewal. One channel for every job; the payload is the job's name, a tab and the sending
# worker's id (pgstream.runtime.group.payload). Liveness only: a lost notification costs a
# wait until the next renewal, never safety.
LISTEN_GROUP = "LISTEN pgstream_group"
NOTIFY_GROUP = "SELECT pg_notify('pgstream_group', %(payload)s)"

# What a worker watches between notifications: the live workers and the partitions whose
# owner is gone (a worker killed with -9 sends no notification; its session is gone at once).
GROUP_SNAPSHOT = f"""
SELECT array(SELECT w.worker FROM pgstream.workers w
              WHERE w.job = %(job)s
                AND w.heartbeat_at > now() - make_interval(secs => %(lease)s)
                AND (w.backend_pid IS NULL
                     OR EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.backend_pid))
              ORDER BY w.started_at, w.worker),
       (SELECT count(*) FROM pgstream.partitions AS p
         WHERE p.job = %(job)s AND ({_ANY_STREAM}) AND ({_OWNER_GONE}))
"""

# -- privileges (pgstream.db.privileges) ------------------------------------------------------

# Every privilege the caller asks for, plus DML on each table and USAGE on each sequence of the
# pgstream schema (read from the catalog, so tables added by later migrations are checked
# too; alembic_version is read-only), checked with has_*_privilege in one round trip. Returns
# one row with the current role and NULLs when nothing is missing, else one row per missing
# privilege. An object that does not exist is skipped (the schema and sink checks name it).
# pg_class/pg_namespace are read directly: to_regclass('pgstream.x') itself fails without
# USAGE on the schema. MATERIALIZED steps: planning the inlined form cost more than running it.
MISSING_PRIVILEGES = """
WITH wanted AS MATERIALIZED (
  SELECT w.kind, w.schema_name, w.rel, w.privilege, w.purpose, w.ord
    FROM unnest(%(kinds)s::text[], %(schemas)s::text[], %(names)s::text[],
                %(privileges)s::text[], %(purposes)s::text[])
         WITH ORDINALITY AS w(kind, schema_name, rel, privilege, purpose, ord)
  UNION ALL
  SELECT CASE WHEN c.relkind = 'S' THEN 'sequence' ELSE 'table' END, n.nspname::text,
         c.relname::text, p.privilege, %(own_purpose)s, 1000000 + row_number() OVER ()
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL unnest(CASE WHEN c.relkind = 'S' THEN ARRAY['USAGE']
                                   WHEN c.relname = 'alembic_version' THEN ARRAY['SELECT']
                                   ELSE %(runtime_privileges)s::text[] END) AS p(privilege)
   WHERE n.nspname = 'pgstream' AND c.relkind IN ('r', 'p', 'S')
), resolved AS MATERIALIZED (
  SELECT w.*,
         CASE WHEN w.kind = 'schema' THEN (SELECT oid FROM pg_namespace WHERE nspname = w.rel)
              WHEN w.kind = 'database' THEN NULL
              WHEN w.schema_name IS NULL THEN to_regclass(quote_ident(w.rel))::oid
              ELSE (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = w.schema_name AND c.relname = w.rel)
         END AS objid
    FROM wanted w
), missing AS MATERIALIZED (
  SELECT r.kind,
         CASE WHEN r.kind IN ('table', 'sequence') THEN
              (SELECT n.nspname::text FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = r.objid)
         END AS schema_name,
         CASE WHEN r.kind = 'database' THEN current_database()::text ELSE r.rel END AS rel,
         r.privilege, r.purpose, r.ord
    FROM resolved r
   WHERE NOT COALESCE(
           CASE r.kind
             WHEN 'database' THEN has_database_privilege(current_database(), r.privilege)
             WHEN 'schema' THEN has_schema_privilege(r.objid, r.privilege)
             WHEN 'table' THEN has_table_privilege(r.objid, r.privilege)
             WHEN 'sequence' THEN has_sequence_privilege(r.objid, r.privilege)
           END, true)
)
SELECT u.me, m.kind, m.schema_name, m.rel, m.privilege, m.purpose
  FROM (SELECT current_user::text AS me) AS u
  LEFT JOIN missing AS m ON true
 ORDER BY m.ord
"""

# The sequence behind a table source's offset column, for ``pgstream db grant`` (NULL row when
# the column has none; no row when the table does not exist yet).
SERIAL_SEQUENCE = """
SELECT pg_get_serial_sequence(%(table)s, %(column)s) WHERE to_regclass(%(table)s) IS NOT NULL
"""

# -- migrations (pgstream.db.migrate) ---------------------------------------------------------

# Alembic's version table, read without Alembic (a quick "is this database at head?").
# to_regclass first: reading a table that does not exist would fail the transaction.
HAS_VERSION_TABLE = "SELECT to_regclass('pgstream.alembic_version') IS NOT NULL"

MIGRATION_REVISIONS = "SELECT version_num FROM pgstream.alembic_version ORDER BY version_num"

# -- status (pgstream status) -----------------------------------------------------------------

# %(job)s: NULL for every job. "leased" says whether ``owner`` is still an owner.
# `pgstream status` reads the view a DBA queries in psql (pgstream.db.tables.VIEWS); the
# columns come in the order of pgstream.commands.status.COLUMNS.
STATUS = """
SELECT s.job, s.source, s.partition, s.committed_offset, s.source_head,
       s.last_commit_at, s.owner, s.epoch, s.batches, s.records,
       s.leased, s.dead_letters, s.lease_expires_at, s.watermark,
       extract(epoch FROM s.last_commit_age)::float8 AS last_commit_age,
       (SELECT count(*) FROM pgstream.skipped_ranges k
         WHERE k.job = s.job AND k.source = s.source AND k.partition = s.partition)
         AS skipped_ranges,
       (SELECT COALESCE(sum(k.to_offset - k.from_offset), 0) FROM pgstream.skipped_ranges k
         WHERE k.job = s.job AND k.source = s.source AND k.partition = s.partition)
         AS skipped_offsets
  FROM pgstream.partition_status AS s
 WHERE %(job)s::text IS NULL OR s.job = %(job)s
 ORDER BY s.job, s.source, s.partition
"""

# `pgstream status --watch`: one summary line per job.
JOB_STATUS = """
SELECT job, plan_version, partitions, owned_partitions, owners, records, lag, dead_letters,
       watermark
  FROM pgstream.job_status
 WHERE %(job)s::text IS NULL OR job = %(job)s
 ORDER BY job
"""

# status: each window operator's job watermark (the view documents the rule)
STATUS_JOB_WATERMARKS = """
SELECT job, operator, watermark, partitions, idle_partitions FROM pgstream.job_watermarks
 WHERE %(job)s::text IS NULL OR job = %(job)s
 ORDER BY job, operator
"""

# -- demo (pgstream demo, pgstream.demo) ------------------------------------------------------

# Records committed so far and the committed offset, polled while the demo's workers run.
DEMO_PROGRESS = """
SELECT COALESCE(sum(records), 0)::bigint, max(committed_offset)
  FROM pgstream.partitions WHERE job = %(job)s
"""

DEMO_DEAD_LETTERS = """
SELECT "offset", operator FROM pgstream.dead_letters WHERE job = %(job)s ORDER BY 1
"""

# How the ledger covers the input file, and the committed offset (one partition).
DEMO_LEDGER = """
SELECT count(*), min(start_offset), max(end_offset), sum(end_offset - start_offset),
       (SELECT committed_offset FROM pgstream.partitions WHERE job = %(job)s)
  FROM pgstream.batches WHERE job = %(job)s
"""

# Records and seconds between each worker's (epoch's) first and last checkpoint.
DEMO_STEADY_RATE = """
SELECT sum(n), sum(span) FROM (
  SELECT sum(records_in) - (array_agg(records_in ORDER BY start_offset))[1] AS n,
         extract(epoch FROM max(committed_at) - min(committed_at)) AS span
    FROM pgstream.batches WHERE job = %(job)s GROUP BY epoch) per_worker
"""


def delete_job_rows(table: str) -> sql.Composed:
    """``DELETE`` the rows of job ``%(job)s`` from the pgstream table ``table``."""
    return sql.SQL("DELETE FROM {} WHERE job = %(job)s").format(sql.Identifier("pgstream", table))


# -- job administration (pgstream job list|rename|reset|retire) -------------------------------
# -- job administration (pgstream job list|rename|reset|retire) -------------------------------
# Each command runs in ONE transaction. It first locks the partition rows it changes
# (NOWAIT: a batch in flight holds them) and refuses while a live owner holds a lease on
# any of them; every row it keeps gets a new epoch, which fences a worker that resumes later.

# The app's append sinks record each row's stream in ``_source``: templates for the sink
# table's identifier (checked to have the column by the caller).
ADMIN_RENAME_SINK_SOURCE = sql.SQL("UPDATE {} SET _source = %(new)s WHERE _source = %(old)s")
ADMIN_DELETE_SINK_SOURCE = sql.SQL("DELETE FROM {} WHERE _source = %(stream)s")
ADMIN_COUNT_SINK_SOURCE = sql.SQL("SELECT count(*) FROM {} WHERE _source = %(stream)s")

# %(streams)s: NULL for every stream of the job.
ADMIN_LOCK_PARTITIONS = f"""
SELECT p.source, p.partition, p.committed_offset, p.owner, NOT ({_OWNER_GONE}) AS held
  FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND ({_ANY_STREAM})
 ORDER BY p.source, p.partition
   FOR UPDATE OF p NOWAIT
"""

ADMIN_COUNT_LEDGER = f"""
SELECT count(*) FROM pgstream.batches AS p WHERE p.job = %(job)s AND ({_ANY_STREAM})
"""

ADMIN_COUNT_DEAD_LETTERS = f"""
SELECT count(*) FROM pgstream.dead_letters AS p WHERE p.job = %(job)s AND ({_ANY_STREAM})
"""

# %(operators)s: NULL for every operator of the job.
ADMIN_COUNT_STATE = """
SELECT count(*) FROM pgstream.state
 WHERE job = %(job)s AND (%(operators)s::text[] IS NULL OR operator = ANY(%(operators)s::text[]))
"""

# Fold operators of a stream no longer in the app: default ids are "<stream>:fold:<table>".
ADMIN_STATE_OPERATORS_WITH_PREFIX = """
SELECT DISTINCT operator FROM pgstream.state
 WHERE job = %(job)s AND starts_with(operator, %(prefix)s)
"""

# Rows of a name that were registered by a start but never committed anything.
ADMIN_DELETE_UNCOMMITTED_PARTITIONS = f"""
DELETE FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND ({_ANY_STREAM}) AND p.committed_offset IS NULL
"""

_FENCE = """
       epoch = epoch + 1, owner = NULL, owner_backend_pid = NULL, owner_backend_start = NULL,
       lease_expires_at = NULL
"""

# The ledger follows through batches_partition_fkey (ON UPDATE CASCADE).
ADMIN_RENAME_JOB_PARTITIONS = f"""
UPDATE pgstream.partitions SET job = %(new)s, {_FENCE} WHERE job = %(old)s
"""

ADMIN_RENAME_STREAM_PARTITIONS = f"""
UPDATE pgstream.partitions SET source = %(new)s, {_FENCE}
 WHERE job = %(job)s AND source = %(old)s
"""

ADMIN_RENAME_JOB_DEAD_LETTERS = "UPDATE pgstream.dead_letters SET job = %(new)s WHERE job = %(old)s"

ADMIN_RENAME_JOB_STATE = "UPDATE pgstream.state SET job = %(new)s WHERE job = %(old)s"

ADMIN_RENAME_JOB_WORKERS = "UPDATE pgstream.workers SET job = %(new)s WHERE job = %(old)s"

# plan_versions follows through plan_versions_job_fkey (ON UPDATE CASCADE).
ADMIN_COUNT_PLAN_VERSIONS = "SELECT count(*) FROM pgstream.plan_versions WHERE job = %(job)s"

ADMIN_RENAME_JOB_ROW = "UPDATE pgstream.jobs SET job = %(new)s WHERE job = %(old)s"

ADMIN_DELETE_JOB_ROW = "DELETE FROM pgstream.jobs WHERE job = %(job)s"

ADMIN_RENAME_STREAM_DEAD_LETTERS = """
UPDATE pgstream.dead_letters SET source = %(new)s WHERE job = %(job)s AND source = %(old)s
"""

ADMIN_RENAME_STATE_OPERATOR = """
UPDATE pgstream.state SET operator = %(new)s WHERE job = %(job)s AND operator = %(old)s
"""

# The job's recorded plans: its current one (version NULL) and every plan version.
ADMIN_LOCK_PLANS = """
SELECT NULL::int AS version, plan FROM pgstream.jobs WHERE job = %(job)s
UNION ALL
SELECT version, plan FROM pgstream.plan_versions WHERE job = %(job)s
"""

ADMIN_LOCK_JOB_ROW = "SELECT 1 FROM pgstream.jobs WHERE job = %(job)s FOR UPDATE"

ADMIN_SET_JOB_PLAN = """
UPDATE pgstream.jobs SET plan = %(plan)s, fingerprint = %(fingerprint)s WHERE job = %(job)s
"""

ADMIN_SET_VERSION_PLAN = """
UPDATE pgstream.plan_versions SET plan = %(plan)s, fingerprint = %(fingerprint)s
 WHERE job = %(job)s AND version = %(version)s
"""

# reset: the row stays (its epoch only grows, so no old owner can ever match it again);
# everything the checkpoint remembered is forgotten.
ADMIN_RESET_PARTITIONS = f"""
UPDATE pgstream.partitions
   SET committed_offset = NULL, watermark = NULL, watermarks = NULL, source_head = NULL,
       last_commit_at = NULL, batches = 0, records = 0, attempts = 0, source_identity = NULL,
       source_instance = NULL, {_FENCE}
 WHERE job = %(job)s AND source = %(stream)s
"""

ADMIN_DELETE_LEDGER = "DELETE FROM pgstream.batches WHERE job = %(job)s AND source = %(stream)s"

ADMIN_DELETE_SKIPS = """
DELETE FROM pgstream.skipped_ranges WHERE job = %(job)s AND source = %(stream)s
"""

ADMIN_DELETE_DEAD_LETTERS = """
DELETE FROM pgstream.dead_letters WHERE job = %(job)s AND source = %(stream)s
"""

ADMIN_DELETE_LATE_RECORDS = """
DELETE FROM pgstream.late_records WHERE job = %(job)s AND source = %(stream)s
"""

ADMIN_RENAME_JOB_LATE_RECORDS = (
    "UPDATE pgstream.late_records SET job = %(new)s WHERE job = %(old)s"
)

ADMIN_RENAME_JOB_REBUILDS = "UPDATE pgstream.rebuilds SET job = %(new)s WHERE job = %(old)s"

ADMIN_RENAME_STREAM_LATE_RECORDS = """
UPDATE pgstream.late_records SET source = %(new)s WHERE job = %(job)s AND source = %(old)s
"""

ADMIN_DELETE_STATE = """
DELETE FROM pgstream.state WHERE job = %(job)s AND operator = ANY(%(operators)s::text[])
"""

# retire: the ledger goes with the rows (batches_partition_fkey ON DELETE CASCADE).
ADMIN_DELETE_PARTITIONS = """
DELETE FROM pgstream.partitions WHERE job = %(job)s AND source = %(stream)s
"""

# After a reset: rows of partitions the source no longer has (a table split into fewer
# partitions, a file that is gone) would stay claimable forever.
ADMIN_DELETE_GONE_PARTITIONS = """
DELETE FROM pgstream.partitions
 WHERE job = %(job)s AND source = %(stream)s AND NOT (partition = ANY(%(keep)s::text[]))
"""

ADMIN_LIST_PARTITIONS = f"""
SELECT p.job, p.source, p.partition, p.committed_offset, p.epoch, p.records, p.batches,
       p.last_commit_at, CASE WHEN NOT ({_OWNER_GONE}) THEN p.owner END AS owner
  FROM pgstream.partitions AS p
 ORDER BY p.job, p.source, p.partition
"""

ADMIN_LIST_JOBS = """
SELECT j.job, j.version, j.fingerprint, j.plan, j.updated_at, v.changes, v.accepted_by
  FROM pgstream.jobs AS j
  LEFT JOIN pgstream.plan_versions AS v ON v.job = j.job AND v.version = j.version
 ORDER BY j.job
"""

ADMIN_LIST_DEAD_LETTERS = """
SELECT job, source, count(*) FROM pgstream.dead_letters GROUP BY job, source
"""

# -- verify: read-only audit of a job (pgstream.verify), in one REPEATABLE READ snapshot -------

VERIFY_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"

VERIFY_PARTITIONS = """
SELECT source, partition, committed_offset, epoch FROM pgstream.partitions
 WHERE job = %(job)s ORDER BY source, partition
"""

# Open dead letters only: a redriven one's record has its effect in the sinks now.
VERIFY_DEAD_LETTERS = """
SELECT source, partition, "offset", operator FROM pgstream.dead_letters
 WHERE job = %(job)s AND NOT redriven
"""

VERIFY_REDRIVEN = """
SELECT count(*) FROM pgstream.dead_letters WHERE job = %(job)s AND redriven
"""

VERIFY_LEDGER = """
SELECT start_offset, end_offset, records_in, plan_version FROM pgstream.batches
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
 ORDER BY start_offset, end_offset
"""

VERIFY_SKIPS = """
SELECT source, partition, from_offset, to_offset, reason, detail, policy, skipped_at
  FROM pgstream.skipped_ranges WHERE job = %(job)s
 ORDER BY source, partition, from_offset
"""

VERIFY_STATES = """
SELECT operator, partition, key, value FROM pgstream.state
 WHERE job = %(job)s AND operator = ANY(%(operators)s)
"""

# -- dead letters: pgstream dlq list|show|redrive (pgstream.redrive) --------------------------
# Filters are NULL when not given. Offsets: from_offset inclusive, to_offset exclusive (as
# every offset range in pgstream). Error and operator match case-insensitive substrings;
# the error filter looks at the original error and the latest redrive error.
_DLQ_FILTER = """
    d.job = %(job)s
AND (%(source)s::text IS NULL OR d.source = %(source)s::text)
AND (%(partition)s::text IS NULL OR d.partition = %(partition)s::text)
AND (%(operator)s::text IS NULL
     OR strpos(lower(coalesce(d.operator, '')), lower(%(operator)s::text)) > 0)
AND (%(error)s::text IS NULL
     OR strpos(lower(d.error), lower(%(error)s::text)) > 0
     OR strpos(lower(coalesce(d.redrive_error, '')), lower(%(error)s::text)) > 0)
AND (%(from_offset)s::bigint IS NULL OR d."offset" >= %(from_offset)s::bigint)
AND (%(to_offset)s::bigint IS NULL OR d."offset" < %(to_offset)s::bigint)
AND (%(redriven)s::boolean IS NULL OR d.redriven = %(redriven)s::boolean)
"""

_DLQ_COLUMNS = """
d.id, d.source, d.partition, d."offset", d.operator, d.error, d.redriven, d.created_at,
d.redriven_at, d.redrive_outcome, d.redrive_attempts, d.redrive_error, length(d.payload)
"""

DLQ_LIST = f"""
SELECT {_DLQ_COLUMNS}
  FROM pgstream.dead_letters AS d
 WHERE {_DLQ_FILTER}
 ORDER BY d.id
 LIMIT %(limit)s
"""

DLQ_COUNT = f"""
SELECT count(*) FILTER (WHERE NOT d.redriven), count(*) FILTER (WHERE d.redriven)
  FROM pgstream.dead_letters AS d
 WHERE {_DLQ_FILTER}
"""

DLQ_SOURCES = f"""
SELECT DISTINCT d.source FROM pgstream.dead_letters AS d WHERE {_DLQ_FILTER} AND NOT d.redriven
"""

DLQ_SHOW = f"""
SELECT {_DLQ_COLUMNS}, d.payload
  FROM pgstream.dead_letters AS d
 WHERE d.job = %(job)s AND d.id = %(id)s
"""

# A redrive chunk's first statement: the job's partition rows (of the stream filter) FOR KEY
# SHARE. A live worker's checkpoint UPDATE does not conflict with it (it changes no key), but
# `pgstream job rename|reset|retire` (FOR UPDATE NOWAIT) refuse while a chunk is in flight,
# and a chunk waits for one of them to finish, so the two never interleave.
DLQ_LOCK_PARTITIONS = """
SELECT p.source, p.partition FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND (%(source)s::text IS NULL OR p.source = %(source)s::text)
   FOR KEY SHARE OF p
"""

# The job's recorded plan: redrive writes only with the plan the job runs (checked per chunk).
DLQ_JOB_PLAN = "SELECT version, fingerprint FROM pgstream.jobs WHERE job = %(job)s"

# The next open dead letters after id %(after)s, locked: a concurrent redrive skips them.
DLQ_CLAIM = f"""
SELECT d.id, d.source, d.partition, d."offset", d.payload, d.operator
  FROM pgstream.dead_letters AS d
 WHERE {_DLQ_FILTER} AND NOT d.redriven AND d.id > %(after)s
 ORDER BY d.id
 LIMIT %(limit)s
   FOR UPDATE OF d SKIP LOCKED
"""

# Compare-and-set: only an open row turns redriven (the caller checks the row count).
DLQ_MARK_REDRIVEN = """
UPDATE pgstream.dead_letters AS d
   SET redriven = true, redriven_at = now(), redrive_outcome = u.outcome,
       redrive_attempts = d.redrive_attempts + 1, redrive_error = NULL
  FROM unnest(%(ids)s::bigint[], %(outcomes)s::text[]) AS u(id, outcome)
 WHERE d.id = u.id AND d.job = %(job)s AND NOT d.redriven
"""

DLQ_MARK_FAILED = """
UPDATE pgstream.dead_letters AS d
   SET redrive_attempts = d.redrive_attempts + 1, redrive_error = u.error
  FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS u(id, error)
 WHERE d.id = u.id AND d.job = %(job)s AND NOT d.redriven
"""

# -- pgstream rewind (pgstream/rewind.py): one fenced transaction ----------------------------

# The partition row, locked like a batch locks it (a batch in flight makes this wait up to the
# transaction's lock_timeout). ``held``: a live worker leases it (it is fenced, not waited for).
REWIND_LOCK_PARTITION = f"""
SELECT p.committed_offset, p.owner, NOT ({_OWNER_GONE}) AS held
  FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND p.source = %(source)s AND p.partition = %(partition)s
   FOR UPDATE OF p
"""

REWIND_PARTITIONS = """
SELECT partition FROM pgstream.partitions WHERE job = %(job)s AND source = %(source)s
 ORDER BY partition
"""

# The ledger rows beyond the rewind point (and the one straddling it), oldest first.
REWIND_LEDGER = """
SELECT start_offset, end_offset, plan_version, records_in, prev_end_offset
  FROM pgstream.batches
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND end_offset > %(to)s
 ORDER BY start_offset
"""

REWIND_SKIPS = """
SELECT from_offset, to_offset, reason FROM pgstream.skipped_ranges
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND to_offset > %(to)s
 ORDER BY from_offset
"""

# Open dead letters of the range: their records wrote nothing (redriven ones did).
REWIND_OPEN_DEAD_OFFSETS = """
SELECT DISTINCT "offset" FROM pgstream.dead_letters
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND "offset" >= %(to)s AND NOT redriven
"""

REWIND_DELETE_DEAD_LETTERS = """
DELETE FROM pgstream.dead_letters
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND "offset" >= %(to)s
"""

REWIND_DELETE_LATE_RECORDS = """
DELETE FROM pgstream.late_records
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND "offset" >= %(to)s
"""

REWIND_DELETE_LEDGER = """
DELETE FROM pgstream.batches
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND start_offset >= %(to)s
"""

# Back to ``to`` (NULL: before the partition's first batch), fenced: a worker leasing the row
# fails its next checkpoint (epoch CAS) and claims the row again, reading from ``to``.
REWIND_MOVE_PARTITION = f"""
UPDATE pgstream.partitions
   SET committed_offset = %(committed)s, batches = greatest(batches - %(batches)s, 0),
       records = greatest(records - %(records)s, 0), attempts = 0, {_FENCE}
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
"""

REWIND_DELETE_SINK_ROWS = sql.SQL(
    "DELETE FROM {} WHERE _source = %(source)s AND _partition = %(partition)s "
    "AND _offset >= %(to)s"
)

# A key row whose count() is back to 0 after a rewind: no record of it is left (a batch never
# writes a count() of 0), so the row goes, as if those records had never been processed.
REWIND_DELETE_EMPTY_KEYS = sql.SQL("DELETE FROM {} WHERE {} = 0")

# -- rewind --to-time (pgstream/rewindtime.py): which batch boundary a time means --------------

# A relative time (``-15m``, ``2 hours``: a PostgreSQL interval, either sign meaning "ago")
# read against the database clock, which also stamps the ledger's ``committed_at``.
REWIND_TIME_AGO = """
SELECT now() - CASE WHEN i < interval '0' THEN -i ELSE i END
  FROM (SELECT %(ago)s::interval AS i) AS t
"""

# The partition's committed offset, the start of the committed batch holding offset ``at``
# (NULL below the first batch) and the start of its first batch.
REWIND_BOUNDARY_AT = """
SELECT p.committed_offset,
       (SELECT max(b.start_offset) FROM pgstream.batches AS b
         WHERE b.job = p.job AND b.source = p.source AND b.partition = p.partition
           AND b.start_offset <= %(at)s),
       (SELECT min(b.start_offset) FROM pgstream.batches AS b
         WHERE b.job = p.job AND b.source = p.source AND b.partition = p.partition)
  FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND p.source = %(source)s AND p.partition = %(partition)s
"""

# The partition's first batch (in offset order) committed at or after ``when``: undoing it
# and everything after it undoes what was committed since ``when``.
REWIND_FIRST_BATCH_SINCE = """
SELECT start_offset, committed_at FROM pgstream.batches
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
   AND committed_at >= %(when)s
 ORDER BY start_offset
 LIMIT 1
"""

# The partition's last commit (for "nothing was committed since").
REWIND_LAST_COMMIT = """
SELECT max(committed_at) FROM pgstream.batches
 WHERE job = %(job)s AND source = %(source)s AND partition = %(partition)s
"""

# -- rebuild (pgstream rebuild) ----------------------------------------------------------------
# The shadow job ``<job>~rebuild`` is an ordinary job (the batch transaction writes it); these
# are the statements around it: its tables, the live offsets that bound its reads, and the
# swap transaction that moves its checkpoint into the live job.

# One rebuild per job at a time: a session-level advisory lock held by the rebuild process
# (released when it ends, also by a kill).
REBUILD_TRY_LOCK = (
    "SELECT pg_try_advisory_lock(hashtext('pgstream.rebuild'), hashtext(%(job)s))"
)

REBUILD_TABLE_EXISTS = """
SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = %(name)s
"""

# {shadow}, {live}: the tables' identifiers
REBUILD_CREATE_TABLE = sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)")
REBUILD_DROP_TABLE = sql.SQL("DROP TABLE IF EXISTS {}")
REBUILD_DROP_TABLE_STRICT = sql.SQL("DROP TABLE {}")
# {table}, {new name}
REBUILD_RENAME_TABLE = sql.SQL("ALTER TABLE {} RENAME TO {}")

# Each partition's committed offset (the live job's bounds the shadow's reads) and records.
REBUILD_OFFSETS = """
SELECT source, partition, committed_offset, records FROM pgstream.partitions
 WHERE job = %(job)s AND source = ANY(%(streams)s::text[])
 ORDER BY source, partition
"""

# The swap: the live rows of the rebuilt streams (a batch in flight holds its row until its
# COMMIT), then the shadow's.
REBUILD_LOCK_PARTITIONS = f"""
SELECT p.source, p.partition, p.committed_offset, p.epoch, p.owner, NOT ({_OWNER_GONE}) AS held
  FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND p.source = ANY(%(streams)s::text[])
 ORDER BY p.source, p.partition
   FOR UPDATE OF p
"""

# The shadow's dead letters of partially rebuilt streams that the live job does not have:
# records the rebuilt sinks would miss (their effect is in neither place).
REBUILD_NEW_DEAD_LETTERS = """
SELECT s.source, s.partition, s."offset", s.error
  FROM pgstream.dead_letters s
 WHERE s.job = %(shadow)s AND s.source = ANY(%(streams)s::text[])
   AND NOT EXISTS (SELECT 1 FROM pgstream.dead_letters l
                    WHERE l.job = %(job)s AND l.source = s.source
                      AND l.partition = s.partition AND l."offset" = s."offset")
 ORDER BY s.source, s.partition, s."offset"
 LIMIT 20
"""

# Operator state, late records and watermark entries of the rebuilt operators.
REBUILD_MOVE_OPERATORS = (
    """
DELETE FROM pgstream.state WHERE job = %(job)s AND operator = ANY(%(operators)s::text[])
""",
    """
UPDATE pgstream.state SET job = %(job)s
 WHERE job = %(shadow)s AND operator = ANY(%(operators)s::text[])
""",
    """
DELETE FROM pgstream.late_records
 WHERE job = %(job)s AND operator = ANY(%(operators)s::text[])
""",
    """
UPDATE pgstream.late_records SET job = %(job)s
 WHERE job = %(shadow)s AND operator = ANY(%(operators)s::text[])
""",
    """
UPDATE pgstream.partitions l
   SET watermarks = m.marks,
       watermark = (SELECT to_timestamp(min(e.value::float8)) FROM jsonb_each_text(m.marks) e)
  FROM (SELECT q.source, q.partition,
               nullif((coalesce(q.watermarks, '{}'::jsonb) - %(operators)s::text[])
                      || coalesce((SELECT jsonb_object_agg(e.key, e.value)
                                     FROM jsonb_each(s.watermarks) e
                                    WHERE e.key = ANY(%(operators)s::text[])), '{}'::jsonb),
                      '{}'::jsonb) AS marks
          FROM pgstream.partitions q
          LEFT JOIN pgstream.partitions s
            ON s.job = %(shadow)s AND s.source = q.source AND s.partition = q.partition
         WHERE q.job = %(job)s AND q.source = ANY(%(streams)s::text[])) m
 WHERE l.job = %(job)s AND l.source = m.source AND l.partition = m.partition
""",
)

# Fully rebuilt streams: the shadow's ledger (under the live job's plan version), skipped
# ranges, dead letters and counters replace the live job's.
REBUILD_MOVE_STREAMS = (
    "DELETE FROM pgstream.batches WHERE job = %(job)s AND source = ANY(%(streams)s::text[])",
    """
UPDATE pgstream.batches SET job = %(job)s, plan_version = %(version)s
 WHERE job = %(shadow)s AND source = ANY(%(streams)s::text[])
""",
    """
DELETE FROM pgstream.skipped_ranges WHERE job = %(job)s AND source = ANY(%(streams)s::text[])
""",
    """
UPDATE pgstream.skipped_ranges SET job = %(job)s
 WHERE job = %(shadow)s AND source = ANY(%(streams)s::text[])
""",
    """
DELETE FROM pgstream.dead_letters WHERE job = %(job)s AND source = ANY(%(streams)s::text[])
""",
    """
UPDATE pgstream.dead_letters SET job = %(job)s
 WHERE job = %(shadow)s AND source = ANY(%(streams)s::text[])
""",
    """
UPDATE pgstream.partitions l
   SET batches = s.batches, records = s.records
  FROM pgstream.partitions s
 WHERE l.job = %(job)s AND l.source = ANY(%(streams)s::text[])
   AND s.job = %(shadow)s AND s.source = l.source AND s.partition = l.partition
""",
)

# Every live row of the rebuilt streams gets an epoch above both jobs' (the moved ledger
# keeps the shadow's epochs) and loses its lease: a live worker's next compare-and-set
# fails, and it claims the row again, reloading the moved state.
REBUILD_FENCE = """
UPDATE pgstream.partitions AS l
   SET epoch = greatest(l.epoch,
                        coalesce((SELECT s.epoch FROM pgstream.partitions AS s
                                   WHERE s.job = %(shadow)s AND s.source = l.source
                                     AND s.partition = l.partition), 0)) + 1,
       owner = NULL, owner_backend_pid = NULL, owner_backend_start = NULL,
       lease_expires_at = NULL, attempts = 0
 WHERE l.job = %(job)s AND l.source = ANY(%(streams)s::text[])
"""


# The rebuilt sink tables: their rows come from this plan version (verify reads it).
REBUILD_RECORD = """
INSERT INTO pgstream.rebuilds (job, sink, plan_version) VALUES (%(job)s, %(sink)s, %(version)s)
ON CONFLICT (job, sink) DO UPDATE SET plan_version = excluded.plan_version, rebuilt_at = now()
"""

VERIFY_REBUILDS = "SELECT sink, plan_version FROM pgstream.rebuilds WHERE job = %(job)s"

# Everything a shadow job wrote to pgstream's schema (the ledger and skipped ranges go with
# its partition rows, its plan versions with its job row).
REBUILD_DROP_JOB = (
    "DELETE FROM pgstream.partitions WHERE job = %(job)s",
    "DELETE FROM pgstream.dead_letters WHERE job = %(job)s",
    "DELETE FROM pgstream.state WHERE job = %(job)s",
    "DELETE FROM pgstream.late_records WHERE job = %(job)s",
    "DELETE FROM pgstream.workers WHERE job = %(job)s",
    "DELETE FROM pgstream.jobs WHERE job = %(job)s",
)

"""SQL for pgstream's own tables: partitions (checkpoint + lease), ledger, dead letters,
state and workers. Every statement the runtime sends to the pgstream schema lives here."""

from __future__ import annotations

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
# owner fails its compare-and-set on the epoch.
CLAIM = f"""
UPDATE pgstream.partitions AS p
   SET epoch = p.epoch + 1,
       owner = %(worker)s,
       owner_backend_pid = pg_backend_pid(),
       owner_backend_start = (SELECT backend_start FROM pg_stat_activity
                               WHERE pid = pg_backend_pid()),
       lease_expires_at = now() + make_interval(secs => %(lease)s)
 WHERE p.job = %(job)s AND p.source = %(source)s AND p.partition = %(partition)s
   AND ({_OWNER_GONE})
RETURNING p.epoch, p.committed_offset, p.attempts
"""

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

CLAIMABLE = f"""
SELECT p.source, p.partition FROM pgstream.partitions AS p
 WHERE p.job = %(job)s AND ({_OWNER_GONE})
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

COUNT_PARTITIONS = "SELECT count(*) FROM pgstream.partitions WHERE job = %(job)s"

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
SELECT source, partition, source_identity FROM pgstream.partitions
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
       attempts = 0
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

COPY_DEAD_LETTERS = """
COPY pgstream.dead_letters (job, source, partition, "offset", payload, error, operator)
FROM STDIN
"""

# -- keyed state (fold) -----------------------------------------------------------------------

LOAD_STATE = """
SELECT key, value::text FROM pgstream.state
 WHERE job = %(job)s AND operator = %(operator)s AND partition = %(partition)s
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

# -- workers ----------------------------------------------------------------------------------

HEARTBEAT = """
INSERT INTO pgstream.workers (job, worker, hostname, pid, backend_pid)
VALUES (%(job)s, %(worker)s, %(hostname)s, %(pid)s, pg_backend_pid())
ON CONFLICT (job, worker) DO UPDATE SET heartbeat_at = now(), backend_pid = pg_backend_pid()
"""

# A worker counts as live while its heartbeat is fresh and its session exists: a worker
# killed with -9 stops counting at once, so the survivors' fair share covers its partitions.
LIVE_WORKERS = """
SELECT count(*) FROM pgstream.workers w
 WHERE w.job = %(job)s AND w.heartbeat_at > now() - make_interval(secs => %(lease)s)
   AND (w.worker = %(worker)s
        OR w.backend_pid IS NULL
        OR EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.backend_pid))
"""

FORGET_WORKER = "DELETE FROM pgstream.workers WHERE job = %(job)s AND worker = %(worker)s"

PRUNE_WORKERS = """
DELETE FROM pgstream.workers
 WHERE job = %(job)s AND heartbeat_at < now() - make_interval(secs => 10 * %(lease)s)
"""

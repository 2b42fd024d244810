"""Job administration: what ``pgstream job list|rename|reset|retire`` do to a stored job.

Every change runs in ONE transaction: it locks the partition rows it touches (refusing while
a live worker leases one of them, or a batch holds it), gives every partition row it keeps a
new epoch (so a worker that resumes later is fenced), changes every table the name or the
checkpoint is stored in, and reports row counts. A dry run of reset/retire runs the same
transaction and rolls it back, so its counts are exactly what the real run would do.

Where a job's names are stored: ``pgstream.partitions`` (the ledger ``pgstream.batches``
follows by ON UPDATE / ON DELETE CASCADE), ``dead_letters``, ``state`` (fold operator ids
default to ``"<stream>:fold:<table>"``), ``workers``, ``jobs`` (``plan_versions`` follows by
cascade) and its plan JSON (see ``plan_contract``: streams keys, ``"stream"`` values and
default fold operator ids), and the ``_source`` column of the app's append sinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.types.json import Jsonb

from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.errors import ConfigError, JobStateError
from pgstream.plan import fingerprint as plan_fingerprint
from pgstream.plan import rename_stream
from pgstream.sinks.introspect import load_table

Cursor = psycopg.Cursor[Any]
Query = str | sql.Composed

STOP_WORKERS_HINT = (
    "stop every `pgstream run` of this job (Ctrl-C or SIGTERM; a killed worker's lease "
    "expires after lease_seconds), then run this command again"
)


@dataclass(frozen=True, slots=True)
class PartitionRow:
    """A locked partition row of a job."""

    source: str
    partition: str
    committed_offset: int | None
    owner: str | None
    held: bool


@dataclass(slots=True)
class Outcome:
    """What a job command did (or, in a dry run, would do): lines for the user."""

    lines: list[str] = field(default_factory=list)
    applied: bool = True

    def add(self, line: str) -> None:
        """Append one line of the report."""
        self.lines.append(line)


# -- shared steps ----------------------------------------------------------------------------


def lock_partitions(cur: Cursor, job: str, streams: list[str] | None) -> list[PartitionRow]:
    """Lock the job's partition rows (of ``streams``; None: all); refuse if a worker has one."""
    try:
        rows = cur.execute(
            queries.ADMIN_LOCK_PARTITIONS, {"job": job, "streams": streams}
        ).fetchall()
    except psycopg.errors.LockNotAvailable:
        raise JobStateError(
            f"job {job!r} is running: a batch in flight holds its partition rows; "
            "stop the job's workers first",
            hint=STOP_WORKERS_HINT,
        ) from None
    parts = [PartitionRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]
    held = [p for p in parts if p.held]
    if held:
        names = ", ".join(f"{p.source}/{p.partition} (worker {p.owner})" for p in held[:5])
        raise JobStateError(
            f"job {job!r} is running: a live worker holds the lease on {names}; "
            "stop the job's workers first",
            hint=STOP_WORKERS_HINT,
        )
    return parts


def _count(cur: Cursor, query: Query, params: dict[str, Any]) -> int:
    row = cur.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def _rowcount(cur: Cursor, query: Query, params: dict[str, Any]) -> int:
    cur.execute(query, params)
    return max(cur.rowcount, 0)


def _offsets(parts: list[PartitionRow]) -> str:
    shown = ", ".join(
        f"{p.partition}={'-' if p.committed_offset is None else p.committed_offset}"
        for p in parts[:4]
    )
    return shown + (f", ... ({len(parts)} partitions)" if len(parts) > 4 else "")


def _append_tables(app: App, stream: str) -> list[str]:
    return list(dict.fromkeys(s.table for s in _sinks_of(app, stream, "append")))


def _sinks_of(app: App, stream: str, kind: str) -> list[SinkSpec]:
    return [s for s in app.sinks if s.kind == kind and s.stream == stream]


def _source_column_sql(cur: Cursor, table: str, statement: sql.SQL) -> sql.Composed:
    """``statement`` ("... {} ...") on the append sink ``table``, checked to have ``_source``."""
    info = load_table(cur.connection, table)
    info.require_columns(("_source",), "append sinks record where each row came from")
    return statement.format(info.ident)


# -- rename ----------------------------------------------------------------------------------


def check_rename_args(app: App, from_job: str | None, streams: list[tuple[str, str]]) -> None:
    """Refuse a rename whose names do not fit the app, with the fix."""
    if from_job is None and not streams:
        raise ConfigError(
            "nothing to rename", hint="give --from-job OLD_JOB and/or --stream OLD=NEW"
        )
    if from_job is not None and from_job == app.name:
        raise ConfigError(
            f"--from-job {from_job!r} is the app's own name",
            hint="--from-job names the job's OLD name; the new one is App(...) in the code",
        )
    olds = [o for o, _ in streams]
    news = [n for _, n in streams]
    for name in {n for n in olds + news if (olds + news).count(n) > 1}:
        raise ConfigError(f"stream {name!r} appears more than once in the --stream renames")
    for old, new in streams:
        if new not in app.sources:
            raise ConfigError(
                f"stream {new!r} is not in app {app.name!r} (its streams: "
                f"{', '.join(app.sources) or 'none'})",
                hint="rename the stream in the code first; --stream takes OLD=NEW",
            )
        if old in app.sources:
            raise ConfigError(
                f"stream {old!r} is still in app {app.name!r}",
                hint=f"rename it to {new!r} in the code first, then run this command",
            )


def rename(
    conn: psycopg.Connection[Any],
    app: App,
    *,
    from_job: str | None,
    streams: list[tuple[str, str]],
) -> Outcome:
    """Rename the job ``from_job`` to ``app.name`` and/or streams OLD -> NEW, in one
    fenced transaction (see the module docstring for every place a name is stored)."""
    check_rename_args(app, from_job, streams)
    outcome = Outcome()
    with conn.transaction(), conn.cursor() as cur:
        if from_job is not None:
            _rename_job(cur, from_job, app.name, outcome)
        for old, new in streams:
            _rename_stream(cur, app, old, new, outcome)
    return outcome


def _refuse_taken(what: str, parts: list[PartitionRow], counts: dict[str, int], hint: str) -> None:
    committed = sorted({p.source for p in parts if p.committed_offset is not None})
    found = [f"committed offsets of {', '.join(committed)}"] if committed else []
    found += [f"{n} {name}" for name, n in counts.items() if n]
    if found:
        raise JobStateError(
            f"{what} already has a checkpoint ({'; '.join(found)}); renaming onto it would "
            "mix two checkpoints",
            hint=hint,
        )


def _rename_job(cur: Cursor, old: str, new: str, outcome: Outcome) -> None:
    old_parts = lock_partitions(cur, old, None)
    if not old_parts:
        raise JobStateError(
            f"job {old!r} has no checkpoint in this database: nothing to rename",
            hint="`pgstream job list` shows the jobs that have one",
        )
    new_parts = lock_partitions(cur, new, None)
    new_job = {"job": new, "streams": None, "operators": None}
    _refuse_taken(
        f"job {new!r}",
        new_parts,
        {
            "ledger batch(es)": _count(cur, queries.ADMIN_COUNT_LEDGER, new_job),
            "dead letter(s)": _count(cur, queries.ADMIN_COUNT_DEAD_LETTERS, new_job),
            "fold state row(s)": _count(cur, queries.ADMIN_COUNT_STATE, new_job),
        },
        hint=f"a run under the name {new!r} has already read records; if it was a mistake, "
        "forget each of its streams first (pgstream job reset MODULE:APP --stream S "
        "--delete-outputs --yes), then rename",
    )
    outcome.add(f"job {old!r} renamed to {new!r}:")
    names = {"old": old, "new": new}
    dropped = _rowcount(cur, queries.ADMIN_DELETE_UNCOMMITTED_PARTITIONS, new_job)
    plans = _count(cur, queries.ADMIN_COUNT_PLAN_VERSIONS, {"job": old})
    old_plan = cur.execute(queries.ADMIN_LOCK_JOB_ROW, {"job": old}).fetchone() is not None
    if old_plan and cur.execute(queries.ADMIN_LOCK_JOB_ROW, {"job": new}).fetchone():
        # a start under the new name recorded the plan before anything was read: the old
        # name's plan history is the one its offsets were made under
        cur.execute(queries.ADMIN_DELETE_JOB_ROW, {"job": new})
        outcome.add(f"  dropped the plan recorded for {new!r} by a start that read nothing")
    ledger = _count(cur, queries.ADMIN_COUNT_LEDGER, {"job": old, "streams": None})
    moved = _rowcount(cur, queries.ADMIN_RENAME_JOB_PARTITIONS, names)
    dead = _rowcount(cur, queries.ADMIN_RENAME_JOB_DEAD_LETTERS, names)
    _rowcount(cur, queries.ADMIN_RENAME_JOB_LATE_RECORDS, names)
    _rowcount(cur, queries.ADMIN_RENAME_JOB_REBUILDS, names)
    state = _rowcount(cur, queries.ADMIN_RENAME_JOB_STATE, names)
    workers = _rowcount(cur, queries.ADMIN_RENAME_JOB_WORKERS, names)
    jobs = _rowcount(cur, queries.ADMIN_RENAME_JOB_ROW, names)
    outcome.add(
        f"  {moved} partition row(s) (new epoch: old workers are fenced), {ledger} ledger "
        f"batch(es), {dead} dead letter(s), {state} fold state row(s), {workers} worker row(s)"
    )
    outcome.add(
        f"  recorded plan: {jobs} job row, {plans} plan version(s)"
        if jobs
        else "  recorded plan: none (the job ran before plans were recorded)"
    )
    if dropped:
        outcome.add(f"  removed {dropped} partition row(s) of {new!r} that had committed nothing")


def _fold_renames(app: App, old: str, new: str) -> list[tuple[str, str]]:
    """Default fold operator ids of ``new``'s folds and what they were called under ``old``."""
    return [
        (f"{old}:fold:{s.table}", s.operator_id)
        for s in _sinks_of(app, new, "fold")
        if s.operator_id == f"{new}:fold:{s.table}"
    ]


def _rename_stream(cur: Cursor, app: App, old: str, new: str, outcome: Outcome) -> None:
    job = app.name
    old_parts = lock_partitions(cur, job, [old])
    if not old_parts:
        raise JobStateError(
            f"stream {old!r} of job {job!r} has no checkpoint: nothing to rename",
            hint="`pgstream job list` shows the streams that have one",
        )
    folds = _fold_renames(app, old, new)
    target = {"job": job, "streams": [new], "operators": [n for _, n in folds]}
    _refuse_taken(
        f"stream {new!r} of job {job!r}",
        lock_partitions(cur, job, [new]),
        {
            "ledger batch(es)": _count(cur, queries.ADMIN_COUNT_LEDGER, target),
            "dead letter(s)": _count(cur, queries.ADMIN_COUNT_DEAD_LETTERS, target),
            "fold state row(s)": _count(cur, queries.ADMIN_COUNT_STATE, target) if folds else 0,
        },
        hint=f"a run has already read {new!r} from the start; if it was a mistake, forget it "
        f"first (pgstream job reset MODULE:APP --stream {new} --delete-outputs --yes; "
        "aggregates it counted stay counted), then rename",
    )
    dropped = _rowcount(cur, queries.ADMIN_DELETE_UNCOMMITTED_PARTITIONS, target)
    ledger = _count(cur, queries.ADMIN_COUNT_LEDGER, {"job": job, "streams": [old]})
    names = {"job": job, "old": old, "new": new}
    moved = _rowcount(cur, queries.ADMIN_RENAME_STREAM_PARTITIONS, names)
    dead = _rowcount(cur, queries.ADMIN_RENAME_STREAM_DEAD_LETTERS, names)
    _rowcount(cur, queries.ADMIN_RENAME_STREAM_LATE_RECORDS, names)
    state = sum(
        _rowcount(cur, queries.ADMIN_RENAME_STATE_OPERATOR, {"job": job, "old": o, "new": n})
        for o, n in folds
    )
    outcome.add(f"stream {old!r} of job {job!r} renamed to {new!r}:")
    outcome.add(
        f"  {moved} partition row(s) at offsets {_offsets(old_parts)} (new epoch: old workers "
        f"are fenced), {ledger} ledger batch(es), {dead} dead letter(s), {state} fold state "
        f"row(s)" + (f" ({', '.join(n for _, n in folds)})" if folds else "")
    )
    for table in _append_tables(app, new):
        stmt = _source_column_sql(cur, table, queries.ADMIN_RENAME_SINK_SOURCE)
        rows = _rowcount(cur, stmt, names)
        outcome.add(f"  append sink {table}: {rows} row(s) now have _source = {new!r}")
    plans = _rewrite_plans(cur, job, old, new)
    outcome.add(
        f"  recorded plan: {plans} plan(s) rewritten with the new name"
        if plans
        else "  recorded plan: none to rewrite"
    )
    if dropped:
        outcome.add(f"  removed {dropped} partition row(s) of {new!r} that had committed nothing")


def _rewrite_plans(cur: Cursor, job: str, old: str, new: str) -> int:
    """Rename the stream in the job's current plan and in every plan version."""
    cur.execute(queries.ADMIN_LOCK_JOB_ROW, {"job": job})
    rewritten = 0
    for version, plan in cur.execute(queries.ADMIN_LOCK_PLANS, {"job": job}).fetchall():
        renamed = rename_stream(plan, old, new)
        if renamed == plan:
            continue
        params = {
            "job": job,
            "version": version,
            "plan": Jsonb(renamed),
            "fingerprint": plan_fingerprint(renamed),
        }
        cur.execute(
            queries.ADMIN_SET_JOB_PLAN if version is None else queries.ADMIN_SET_VERSION_PLAN,
            params,
        )
        rewritten += 1
    return rewritten


# -- reset -----------------------------------------------------------------------------------


def reset(
    conn: psycopg.Connection[Any], app: App, stream: str, *, delete_outputs: bool, apply: bool
) -> Outcome:
    """Forget ``stream``'s checkpoint so the next run reads it from the start: its offsets
    and ledger, its folds' state and its dead letters (and, with ``delete_outputs``, its
    append sink rows). Without ``apply`` the transaction is rolled back (a dry run)."""
    job = app.name
    if stream not in app.sources:
        raise ConfigError(
            f"stream {stream!r} is not in app {job!r} (its streams: {', '.join(app.sources)})",
            hint=f"to drop the checkpoint of a stream removed from the code: "
            f"pgstream job retire MODULE:APP --stream {stream} --yes",
        )
    outcome = Outcome(applied=apply)
    with conn.transaction(force_rollback=not apply), conn.cursor() as cur:
        parts = lock_partitions(cur, job, [stream])
        if not any(p.committed_offset is not None for p in parts):
            outcome.add(f"stream {stream!r} of job {job!r} has no checkpoint: nothing to reset")
            outcome.applied = False
            return outcome
        p = {"job": job, "stream": stream}
        outcome.add(f"reset stream {stream!r} of job {job!r}: the next run reads it from the start")
        ledger = _rowcount(cur, queries.ADMIN_DELETE_LEDGER, p)
        _rowcount(cur, queries.ADMIN_DELETE_SKIPS, p)
        _rowcount(cur, queries.ADMIN_RESET_PARTITIONS, p)
        keep = list(app.sources[stream].partitions(conn))
        _rowcount(cur, queries.ADMIN_DELETE_GONE_PARTITIONS, {**p, "keep": keep})
        outcome.add(
            f"  checkpoint: {len(parts)} partition(s) back to the start (were at "
            f"{_offsets(parts)}), {ledger} ledger batch(es) deleted"
        )
        folds = _sinks_of(app, stream, "fold")
        windows = [
            s.operator_id
            for s in _sinks_of(app, stream, "aggregate")
            if s.window is not None and not s.window.plain
        ]
        operators = [s.operator_id for s in folds]
        state = _rowcount(cur, queries.ADMIN_DELETE_STATE, {**p, "operators": operators})
        if operators:
            outcome.add(f"  fold state: {state} key(s) deleted ({', '.join(operators)})")
        if windows:
            state = _rowcount(cur, queries.ADMIN_DELETE_STATE, {**p, "operators": windows})
            outcome.add(f"  open windows: {state} deleted ({', '.join(windows)})")
        dead = _rowcount(cur, queries.ADMIN_DELETE_DEAD_LETTERS, p)
        outcome.add(f"  dead letters: {dead} deleted (failing records fail again if still bad)")
        if windows:
            late = _rowcount(cur, queries.ADMIN_DELETE_LATE_RECORDS, p)
            outcome.add(f"  late records: {late} deleted (and the watermarks)")
        _reset_outputs(cur, app, stream, delete_outputs, outcome)
    return outcome


def _reset_outputs(
    cur: Cursor, app: App, stream: str, delete_outputs: bool, outcome: Outcome
) -> None:
    """Say what happens to each sink of ``stream``; delete append rows if asked."""
    p = {"stream": stream}
    for table in _append_tables(app, stream):
        if delete_outputs:
            stmt = _source_column_sql(cur, table, queries.ADMIN_DELETE_SINK_SOURCE)
            rows = _rowcount(cur, stmt, p)
            outcome.add(f"  append sink {table}: {rows} row(s) deleted; written again on re-read")
            continue
        rows = _count(cur, _source_column_sql(cur, table, queries.ADMIN_COUNT_SINK_SOURCE), p)
        outcome.add(
            f"  append sink {table}: {rows} row(s) kept; a re-read record whose output is "
            "already there (same _source, _partition, _offset) is skipped as a duplicate"
        )
        outcome.add(
            "    (rows keep their old values; if the source now holds other records at those "
            "offsets, their outputs are dropped: --delete-outputs deletes the rows so they are "
            "written again)"
        )
    for spec in _unique_tables(_sinks_of(app, stream, "aggregate")):
        outcome.add(
            f"  aggregate sink {spec.table}: rows are NOT retracted: every record of "
            f"{stream!r} is counted again (clear or fix the table yourself if that is wrong)"
        )
    for spec in _unique_tables(_sinks_of(app, stream, "fold")):
        outcome.add(
            f"  fold sink {spec.table}: rows are NOT deleted; each key's row is overwritten "
            "as the fold runs again from its initial state"
        )


def _unique_tables(specs: list[SinkSpec]) -> list[SinkSpec]:
    return list({s.table: s for s in specs}.values())


# -- retire ----------------------------------------------------------------------------------


def retire(conn: psycopg.Connection[Any], app: App, stream: str, *, apply: bool) -> Outcome:
    """Drop the checkpoint rows of ``stream``, which is no longer in the app: its partition
    rows (and ledger) and its folds' state. Sink rows and dead letters are kept. Without
    ``apply`` the transaction is rolled back (a dry run)."""
    job = app.name
    if stream in app.sources:
        raise ConfigError(
            f"stream {stream!r} is still in app {job!r}; remove it from the code first",
            hint=f"to re-read it from the start instead: "
            f"pgstream job reset MODULE:APP --stream {stream}",
        )
    outcome = Outcome(applied=apply)
    with conn.transaction(force_rollback=not apply), conn.cursor() as cur:
        parts = lock_partitions(cur, job, [stream])
        if not parts:
            outcome.add(
                f"stream {stream!r} of job {job!r} has no checkpoint rows: nothing to retire"
            )
            outcome.applied = False
            return outcome
        p = {"job": job, "stream": stream}
        operators = _retired_operators(cur, app, stream)
        ledger = _count(cur, queries.ADMIN_COUNT_LEDGER, {"job": job, "streams": [stream]})
        deleted = _rowcount(cur, queries.ADMIN_DELETE_PARTITIONS, p)
        state = _rowcount(cur, queries.ADMIN_DELETE_STATE, {**p, "operators": operators})
        dead = _count(cur, queries.ADMIN_COUNT_DEAD_LETTERS, {"job": job, "streams": [stream]})
        outcome.add(f"retire stream {stream!r} of job {job!r} (no longer in the app):")
        outcome.add(
            f"  checkpoint: {deleted} partition row(s) deleted (were at {_offsets(parts)}), "
            f"{ledger} ledger batch(es) deleted"
        )
        outcome.add(
            f"  fold state: {state} key(s) deleted"
            + (f" ({', '.join(operators)})" if operators else "")
        )
        outcome.add(
            f"  dead letters: {dead} kept (pgstream.dead_letters rows with source = {stream!r})"
        )
        outcome.add(
            f"  sink rows: kept (append rows keep _source = {stream!r}; aggregates keep what "
            f"{stream!r} counted)"
        )
    return outcome


def _retired_operators(cur: Cursor, app: App, stream: str) -> list[str]:
    """Fold operators of a removed stream: those the recorded plans name for it, and any
    stored under its default ids ``"<stream>:fold:..."``; never one the app still uses."""
    found: set[str] = set()
    for _version, plan in cur.execute(queries.ADMIN_LOCK_PLANS, {"job": app.name}).fetchall():
        for sink in plan.get("sinks") or []:
            if isinstance(sink, dict) and sink.get("stream") == stream and sink.get("operator"):
                found.add(str(sink["operator"]))
    rows = cur.execute(
        queries.ADMIN_STATE_OPERATORS_WITH_PREFIX, {"job": app.name, "prefix": f"{stream}:fold:"}
    ).fetchall()
    found.update(str(r[0]) for r in rows)
    in_use = {s.operator_id for s in app.sinks if s.kind == "fold"}
    return sorted(found - in_use)


# -- list ------------------------------------------------------------------------------------


def list_jobs(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every job in the database: its recorded plan (if any) and, per stream, its partitions,
    committed offsets and dead letters; ``orphan`` marks streams the recorded plan lacks."""
    jobs: dict[str, dict[str, Any]] = {}

    def job_entry(name: str) -> dict[str, Any]:
        return jobs.setdefault(
            name,
            {
                "job": name,
                "plan_version": None,
                "fingerprint": None,
                "plan_changed_at": None,
                "last_change": None,
                "accepted_by": None,
                "planned_streams": None,
                "streams": {},
            },
        )

    for name, version, fingerprint, plan, changed_at, changes, by in conn.execute(
        queries.ADMIN_LIST_JOBS
    ).fetchall():
        entry = job_entry(name)
        entry.update(
            plan_version=version,
            fingerprint=fingerprint,
            plan_changed_at=changed_at,
            last_change=changes,
            accepted_by=by,
            planned_streams=sorted((plan or {}).get("streams") or {}),
        )
    for job, source, partition, offset, epoch, records, batches, last, owner in conn.execute(
        queries.ADMIN_LIST_PARTITIONS
    ).fetchall():
        stream = _stream_entry(job_entry(job), source)
        stream["partitions"].append(
            {
                "partition": partition,
                "committed_offset": offset,
                "epoch": epoch,
                "records": records,
                "batches": batches,
                "last_commit_at": last,
                "owner": owner,
            }
        )
    for job, source, count in conn.execute(queries.ADMIN_LIST_DEAD_LETTERS).fetchall():
        _stream_entry(job_entry(job), source)["dead_letters"] = int(count)
    return [_finish(jobs[name]) for name in sorted(jobs)]


def _stream_entry(job: dict[str, Any], source: str) -> dict[str, Any]:
    streams: dict[str, dict[str, Any]] = job["streams"]
    return streams.setdefault(
        source, {"stream": source, "partitions": [], "dead_letters": 0, "orphan": None}
    )


def _finish(job: dict[str, Any]) -> dict[str, Any]:
    planned = job["planned_streams"]
    streams = list(job["streams"].values())
    for stream in streams:
        if planned is not None:
            stream["orphan"] = bool(stream["partitions"]) and stream["stream"] not in planned
    job["streams"] = streams
    job["orphan_streams"] = [s["stream"] for s in streams if s["orphan"]]
    return job

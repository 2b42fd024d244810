"""The start-up check of a job's identity and plan (run by every worker after ``prepare``).

In one transaction, serialized per job by a transaction-level advisory lock:

1. every stream's partition rows must belong to the source the app reads now
   (``partitions.source_identity``); one that does not is refused, whatever the options;
2. the app's plan is compared with the job's recorded plan (:mod:`pgstream.plan`):

   * no recorded plan: a new job records version 1 (refused, without ``--accept-changes``,
     if another job already writes one of its sink tables); a job from before plan tracking
     (it has partitions) adopts the current plan as version 1;
   * the same fingerprint: run under the recorded version;
   * a different one: refused with every change listed, or, with ``--accept-changes``,
     recorded as the next version while every partition's epoch is bumped, so no worker
     still running the old plan can commit afterwards;

3. the partitions are registered (stamped with their source identity).

Returns the plan version this worker commits under; each batch records it and the batch's
compare-and-set requires it to still be the job's version.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgstream import plan as plans
from pgstream.api import App
from pgstream.db import queries
from pgstream.errors import PgStreamError

log = logging.getLogger("pgstream.jobcheck")

RegisterFn = Callable[[psycopg.Connection[Any]], None]


class SourceChangedError(PgStreamError):
    """A stream's checkpoint belongs to another source than the one the app reads."""


class PlanChangedError(PgStreamError):
    """The app's plan differs from the job's recorded plan (or a newer one was accepted)."""


@dataclass(frozen=True, slots=True)
class JobPlan:
    """The plan this worker runs under."""

    version: int
    fingerprint: str
    plan: plans.Plan


def check_job(
    conn: psycopg.Connection[Any],
    app: App,
    register: RegisterFn,
    *,
    accept_changes: bool = False,
    target: str = "MODULE:APP",
) -> JobPlan:
    """Check identities and the plan, record it if new or accepted, then ``register(conn)``
    the partitions, all in one transaction; return the plan version to run under."""
    plan = plans.describe(app)
    fp = plans.fingerprint(plan)
    with conn.transaction():
        conn.execute(queries.LOCK_JOB, {"job": app.name})
        row = conn.execute(queries.LOAD_JOB, {"job": app.name}).fetchone()
        _check_identities(conn, app, plan, row[2] if row is not None else None, target)
        if row is None:
            version = _first_version(conn, app, plan, fp, accept_changes, target)
        elif row[1] == fp:
            version = int(row[0])
        else:
            version = _changed(conn, app, (int(row[0]), row[2]), plan, fp, accept_changes, target)
        register(conn)
        for name, source in app.sources.items():
            conn.execute(
                queries.ADOPT_SOURCE_IDENTITY,
                {"job": app.name, "source": name, "identity": source.identity()},
            )
    return JobPlan(version, fp, plan)


def job_version(conn: psycopg.Connection[Any], job: str) -> int | None:
    """The job's current plan version, as committed (None: no recorded plan)."""
    row = conn.execute(queries.JOB_VERSION, {"job": job}).fetchone()
    return None if row is None else int(row[0])


def _check_identities(
    conn: psycopg.Connection[Any],
    app: App,
    plan: plans.Plan,
    recorded_plan: plans.Plan | None,
    target: str,
) -> None:
    """Refuse a stream whose partition rows belong to another source."""
    recorded = plans.stream_sources(recorded_plan) if recorded_plan is not None else {}
    problems = []
    seen: set[str] = set()
    for source, _partition, stored, committed in conn.execute(
        queries.PARTITION_IDENTITIES, {"job": app.name}
    ).fetchall():
        if source not in app.sources or source in seen:
            continue
        if stored is None and committed is None:
            continue  # no checkpoint (e.g. reset): nothing whose offsets could be misread
        # a row from before plan tracking is judged by the recorded plan, if there is one
        stored = stored if stored is not None else recorded.get(source)
        now = plan["streams"][source]["source"]
        if stored is not None and stored != now:
            seen.add(source)
            problems.append((source, stored, now))
    if not problems:
        return
    lines = [
        f"stream {s!r} of job {app.name!r} has a checkpoint for {old}, but the app now reads "
        f"{new}: its offsets mean nothing there, so it is not resumed"
        for s, old, new in problems
    ]
    streams = " ".join(f"--stream {s}" for s, _, _ in problems)
    raise SourceChangedError(
        "\n".join(lines),
        hint=(
            "if this is a different job, give the App another name (ps.App('...')); to start "
            f"the stream over from the beginning of the new source, run `pgstream job reset "
            f"{target} {streams} --yes`, then run it with --accept-changes (which alone does "
            "not resume a changed source)"
        ),
    )


def _accepted_by() -> str:
    import getpass  # only when a plan version is recorded

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _record(
    conn: psycopg.Connection[Any],
    job: str,
    version: int,
    plan: plans.Plan,
    fp: str,
    changes: str | None,
) -> None:
    params = {
        "job": job,
        "version": version,
        "fingerprint": fp,
        "plan": Jsonb(plan),
        "changes": changes,
        "accepted_by": _accepted_by(),
    }
    conn.execute(queries.INSERT_JOB if version == 1 else queries.UPDATE_JOB, params)
    conn.execute(queries.INSERT_PLAN_VERSION, params)


def _first_version(
    conn: psycopg.Connection[Any],
    app: App,
    plan: plans.Plan,
    fp: str,
    accept_changes: bool,
    target: str,
) -> int:
    """Record version 1 of a job with no recorded plan."""
    has_partitions = conn.execute(
        queries.COUNT_PARTITIONS, {"job": app.name, "streams": None}
    ).fetchone()
    if has_partitions is not None and has_partitions[0] > 0:
        log.warning(
            "job %r has checkpoints from before plan tracking: its current plan is recorded as "
            "version 1 without comparison to the plan those batches ran under",
            app.name,
        )
        _record(conn, app.name, 1, plan, fp, "adopted: the job ran before plans were recorded; "
                "its earlier plan is unknown")
        return 1
    clashes = _tables_of_other_jobs(conn, app.name, plan)
    if clashes and not accept_changes:
        other, tables = clashes[0]
        raise PlanChangedError(
            f"job {app.name!r} is new but job {other!r} already writes {', '.join(tables)}: "
            f"if you renamed the App run `pgstream job rename {target} --from-job {other}` "
            "(keeps offsets); two jobs writing one table count every record twice",
            hint="if both jobs should really write it, run again with --accept-changes",
        )
    changes = None
    if clashes:
        changes = "; ".join(f"shares {', '.join(t)} with job {j!r}" for j, t in clashes)
    _record(conn, app.name, 1, plan, fp, changes)
    return 1


def _tables_of_other_jobs(
    conn: psycopg.Connection[Any], job: str, plan: plans.Plan
) -> list[tuple[str, list[str]]]:
    mine = {s["table"] for s in plan["sinks"]}
    out = []
    for other, other_plan in conn.execute(queries.OTHER_JOBS, {"job": job}).fetchall():
        shared = sorted(mine & {s["table"] for s in other_plan.get("sinks", [])})
        if shared:
            out.append((other, shared))
    return out


def _changed(
    conn: psycopg.Connection[Any],
    app: App,
    current: tuple[int, plans.Plan],
    plan: plans.Plan,
    fp: str,
    accept_changes: bool,
    target: str,
) -> int:
    """The plan differs from the recorded one: refuse, or record the next version."""
    version, old_plan = current
    changes = plans.diff(old_plan, plan, target=target)
    text = "\n".join(f"  - {c.text()}" for c in changes) or "  - (no visible difference)"
    if not accept_changes:
        raise PlanChangedError(
            _refusal(conn, app.name, version, fp) + f"\n{text}",
            hint=f"to run the new plan, run `pgstream run {target} --accept-changes` (recorded "
            f"as plan version {version + 1}); otherwise deploy the code of version {version}",
        )
    _record(conn, app.name, version + 1, plan, fp, "\n".join(c.text() for c in changes))
    conn.execute(queries.FENCE_JOB, {"job": app.name})
    log.warning(
        "job %r: accepted plan version %d (workers of older versions are fenced):\n%s",
        app.name,
        version + 1,
        text,
    )
    return version + 1


def _refusal(conn: psycopg.Connection[Any], job: str, version: int, fp: str) -> str:
    older = conn.execute(queries.FIND_PLAN_VERSION, {"job": job, "fingerprint": fp}).fetchone()
    if older is not None:
        return (
            f"this code is plan version {older[0]} of job {job!r}, but version {version} has "
            f"been accepted since (is this an old deployment?); it differs from the current "
            "plan by:"
        )
    return f"the plan of job {job!r} changed since plan version {version}:"

"""What a rebuild rebuilds, and the shadow job that does it.

The shadow job is an ordinary job named ``<job>~rebuild``: the live app's streams that feed
the selected sinks, the selected sinks with their tables replaced by shadow tables
(``<table>__rebuild``, created ``LIKE`` the live table ``INCLUDING ALL``), no ``@app.batch``
handlers and no pushdown. Its operator ids stay the live ones, so its state rows, watermark
entries and late records need only their ``job`` changed at the swap.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgstream import plan as plans
from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.db.names import display_name, parse_table_name
from pgstream.errors import ConfigError, JobStateError
from pgstream.runtime.jobcheck import PlanChangedError
from pgstream.sinks.introspect import TableInfo, load_table

#: the shadow job's name is the live job's with this suffix
JOB_SUFFIX = "~rebuild"
#: a shadow table's name is the live table's with this suffix
TABLE_SUFFIX = "__rebuild"
#: the live table's name while it is swapped out (dropped unless --keep-old)
OLD_SUFFIX = "__old"
#: PostgreSQL's longest identifier, in bytes
MAX_IDENTIFIER = 63


def shadow_job(job: str) -> str:
    """The name of ``job``'s shadow job."""
    return job + JOB_SUFFIX


def suffixed(name: str, suffix: str) -> str:
    """``name + suffix`` cut to PostgreSQL's 63 bytes: a long name keeps a prefix (whole
    characters) and a short hash of itself, so two long names do not collide."""
    whole = name + suffix
    if len(whole.encode()) <= MAX_IDENTIFIER:
        return whole
    tag = "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER - len((tag + suffix).encode())
    prefix = name.encode()[:room].decode(errors="ignore")
    return prefix + tag + suffix


@dataclass(frozen=True, slots=True)
class Selection:
    """The sinks a rebuild rebuilds and the streams that feed them.

    A stream is rebuilt *fully* when every sink it feeds is selected and it has no
    ``@app.batch`` handler: its ledger, dead letters and counters are then replaced by the
    shadow's. Otherwise the live ledger and dead letters stay (``--sink``).
    """

    app: App
    sinks: tuple[SinkSpec, ...]

    @property
    def tables(self) -> tuple[str, ...]:
        """The selected sink tables, in the app's order."""
        return tuple(dict.fromkeys(s.table for s in self.sinks))

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams feeding the selected sinks, in the app's order."""
        return tuple(dict.fromkeys(s.stream for s in self.sinks))

    @property
    def operators(self) -> tuple[str, ...]:
        """The operator ids of the selected sinks (folds, windows): their state moves."""
        return tuple(dict.fromkeys(s.operator_id for s in self.sinks if s.operator_id))

    @property
    def full_streams(self) -> tuple[str, ...]:
        """The streams whose every effect is rebuilt (see the class docstring)."""
        chosen = {id(s) for s in self.sinks}
        return tuple(
            name
            for name in self.streams
            if all(id(s) in chosen for s in self.app.sinks if s.stream == name)
            and not any(h.stream == name for h in self.app.handlers)
        )

    @property
    def partial_streams(self) -> tuple[str, ...]:
        """The streams of which only some effects are rebuilt."""
        full = set(self.full_streams)
        return tuple(s for s in self.streams if s not in full)


def select(app: App, tables: Sequence[str]) -> Selection:
    """The selection for ``--sink`` names ``tables`` (none: every sink of ``app``), or one
    clear refusal."""
    if not app.sinks:
        raise ConfigError(f"app {app.name!r} has no sinks: there is nothing to rebuild")
    if not tables:
        if app.handlers:
            names = ", ".join(sorted({h.name for h in app.handlers}))
            raise ConfigError(
                f"app {app.name!r} has @app.batch handlers ({names}): their effects are their "
                "own writes, which a rebuild cannot replay into a shadow table",
                hint="rebuild the sinks with --sink TABLE (once per sink); the handlers' "
                "tables stay as they are",
            )
        chosen = list(app.sinks)
    else:
        known = list(dict.fromkeys(s.table for s in app.sinks))
        unknown = [t for t in tables if t not in known]
        if unknown:
            raise ConfigError(
                f"app {app.name!r} has no sink {', '.join(map(repr, unknown))} (its sinks: "
                f"{', '.join(known)})",
                hint="name a sink table exactly as the app's to_table() does",
            )
        chosen = [s for s in app.sinks if s.table in tables]
    folded = sorted({s.table for s in chosen if s.repartition is not None})
    if folded:
        raise ConfigError(
            f"sink(s) {', '.join(folded)} fold through a repartition "
            "(pgstream.repartition): rebuild does not replay repartitioned folds yet",
            hint="rebuild the other sinks with --sink, or reset the stream "
            "(`pgstream job reset MODULE:APP --stream S --delete-outputs --yes`) and run again",
        )
    return Selection(app, tuple(chosen))


@dataclass(frozen=True, slots=True)
class TablePair:
    """A live sink table and its shadow."""

    live: TableInfo
    shadow_name: str  # the shadow's relation name (in the live table's schema)

    @property
    def shadow(self) -> str:
        """The shadow table as a ``to_table`` name (schema-qualified, quoted as needed)."""
        return display_name(self.live.schema, self.shadow_name)

    @property
    def shadow_ident(self) -> sql.Identifier:
        """The shadow table's quoted, schema-qualified identifier."""
        return sql.Identifier(self.live.schema, self.shadow_name)

    @property
    def old_name(self) -> str:
        """The live table's name while it is swapped out."""
        return suffixed(self.live.name, OLD_SUFFIX)


class Shadow:
    """The shadow job of a selection: its app, its tables and its recorded plan."""

    def __init__(self, selection: Selection, pairs: dict[str, TablePair]) -> None:
        self.selection = selection
        self.pairs = pairs
        live = selection.app
        app = App(shadow_job(live.name))
        app.settings = dataclasses.replace(live.settings, pushdown=False)
        app.sources = {name: live.sources[name] for name in selection.streams}
        app.sinks = [
            dataclasses.replace(spec, table=pairs[spec.table].shadow) for spec in selection.sinks
        ]
        #: the derived app the shadow job runs
        self.app = app

    @classmethod
    def load(cls, conn: psycopg.Connection[Any], selection: Selection) -> Shadow:
        """The shadow of ``selection`` (its tables looked up, not created)."""
        pairs = {}
        for table in selection.tables:
            info = load_table(conn, table)
            pairs[table] = TablePair(info, suffixed(info.name, TABLE_SUFFIX))
        return cls(selection, pairs)

    @property
    def job(self) -> str:
        """The shadow job's name."""
        return self.app.name

    def recorded(self, conn: psycopg.Connection[Any]) -> tuple[int, str] | None:
        """The shadow job's recorded (plan version, fingerprint), if it has started."""
        row = conn.execute(queries.DLQ_JOB_PLAN, {"job": self.job}).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def lock(self, conn: psycopg.Connection[Any]) -> None:
        """Hold the job's rebuild lock for the session of ``conn``; refuse if another rebuild
        of the job holds it."""
        row = conn.execute(queries.REBUILD_TRY_LOCK, {"job": self.selection.app.name}).fetchone()
        if row is None or not row[0]:
            raise JobStateError(
                f"another `pgstream rebuild` of job {self.selection.app.name!r} is running",
                hint="wait for it to finish (or stop it: a rebuild run again resumes)",
            )

    def check_resumable(self, conn: psycopg.Connection[Any]) -> None:
        """Refuse to resume a shadow job recorded with another plan (the code changed)."""
        found = self.recorded(conn)
        if found is not None and found[1] != plans.fingerprint(plans.describe(self.app)):
            raise PlanChangedError(
                f"an interrupted rebuild of job {self.selection.app.name!r} left shadow job "
                f"{self.job!r}, which ran other code or other sinks than this rebuild: it "
                "cannot be resumed",
                hint="run the rebuild with --restart (drops the shadow job and its tables and "
                "starts over)",
            )

    def drop(self, conn: psycopg.Connection[Any]) -> None:
        """Drop the shadow job's rows and tables (``--restart``), in one transaction: this
        selection's shadow tables and those of the sinks the shadow job recorded (an earlier
        rebuild may have selected others)."""
        with conn.transaction():
            conn.execute(queries.LOCK_JOB, {"job": self.job})
            row = conn.execute(queries.LOAD_JOB, {"job": self.job}).fetchone()
            names = {(pair.live.schema, pair.shadow_name) for pair in self.pairs.values()}
            for entry in row[2].get("sinks", []) if row is not None else []:
                schema, name = parse_table_name(str(entry.get("table", "")))
                if schema is not None and name.endswith(TABLE_SUFFIX):
                    names.add((schema, name))
            drop_shadow_job(conn, self.job)
            for schema, name in sorted(names):
                conn.execute(queries.REBUILD_DROP_TABLE.format(sql.Identifier(schema, name)))

    def create_tables(self, conn: psycopg.Connection[Any]) -> list[str]:
        """Create the shadow tables that do not exist yet (a fresh shadow job gets empty ones);
        return the ones created."""
        fresh = self.recorded(conn) is None
        made = []
        with conn.transaction():
            for pair in self.pairs.values():
                ident = pair.shadow_ident
                if fresh:
                    conn.execute(queries.REBUILD_DROP_TABLE.format(ident))
                params = {"schema": pair.live.schema, "name": pair.shadow_name}
                if conn.execute(queries.REBUILD_TABLE_EXISTS, params).fetchone() is not None:
                    continue
                conn.execute(queries.REBUILD_CREATE_TABLE.format(ident, pair.live.ident))
                made.append(pair.shadow)
        return made

    def check_old_tables(self, conn: psycopg.Connection[Any]) -> None:
        """Refuse when a live table's swap-out name is taken (an earlier ``--keep-old``)."""
        for table, pair in self.pairs.items():
            check_old_table(conn, pair, table)


def check_old_table(conn: psycopg.Connection[Any], pair: TablePair, table: str) -> None:
    """Refuse when ``pair``'s swap-out name ``<table>__old`` is taken."""
    params = {"schema": pair.live.schema, "name": pair.old_name}
    if conn.execute(queries.REBUILD_TABLE_EXISTS, params).fetchone() is not None:
        old = display_name(pair.live.schema, pair.old_name)
        raise ConfigError(
            f"table {old} exists (kept by an earlier rebuild with --keep-old?): the swap of "
            f"{table} renames the live table to that name",
            hint=f"drop it (DROP TABLE {old}) and rebuild again",
        )


def drop_shadow_job(conn: psycopg.Connection[Any], job: str) -> None:
    """Delete every row of shadow job ``job`` (in the caller's transaction)."""
    if not job.endswith(JOB_SUFFIX):
        raise JobStateError(f"{job!r} is not a shadow job")  # a guard: never a live job
    for stmt in queries.REBUILD_DROP_JOB:
        conn.execute(stmt, {"job": job})


def check_live_plan(conn: psycopg.Connection[Any], app: App, target: str) -> int:
    """The live job's plan version, when today's code is its recorded plan; else refuse."""
    row = conn.execute(queries.DLQ_JOB_PLAN, {"job": app.name}).fetchone()
    if row is None:
        raise JobStateError(
            f"job {app.name!r} has no recorded plan: it never ran, so there is nothing to rebuild",
            hint=f"run it: pgstream run {target}",
        )
    if row[1] != plans.fingerprint(plans.describe(app)):
        raise PlanChangedError(
            f"the app's code differs from the recorded plan of job {app.name!r}: a rebuild "
            "swaps its results in under the job's plan, so it must be the plan the job runs",
            hint=f"record the new plan first with `pgstream run {target} --accept-changes` "
            "(that is also how a new sink joins the job), then rebuild",
        )
    return int(row[0])

"""The privileges pgstream needs: checked at start in one round trip, printed as GRANTs.

Two roles (README "Permissions"):

* the **migration role** owns the ``pgstream`` schema and runs ``pgstream db upgrade``; it needs
  CREATE on the database, or a schema a DBA created for it (``CREATE SCHEMA pgstream
  AUTHORIZATION ...``);
* the **runtime role** runs ``pgstream run`` / ``status`` / ``verify``: USAGE on the schema,
  DML on its tables (SELECT only on ``alembic_version``), USAGE on its sequences, TEMPORARY
  on the database for the stage tables of upsert sinks and folds, SELECT on source tables,
  INSERT on append sinks and SELECT, INSERT, UPDATE on upsert (aggregate, fold) sinks
  (``verify`` also reads every sink, so SELECT on append sinks too).

:func:`check_privileges` runs in the worker's prepare step and raises one
:class:`~pgstream.errors.PrivilegeError` naming every missing grant and the GRANT that fixes it;
:func:`grant_statements` is what ``pgstream db grant ROLE`` prints; :func:`explain_denied`
turns a stray SQLSTATE 42501 into the same kind of message (the CLI's fallback).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psycopg

from pgstream.db import queries
from pgstream.db.queries import SCHEMA
from pgstream.errors import PrivilegeError

if TYPE_CHECKING:
    from pgstream.api import App

__all__ = [
    "RUNTIME_TABLE_PRIVILEGES",
    "Missing",
    "Need",
    "app_needs",
    "check_privileges",
    "explain_denied",
    "grant_statements",
    "missing_privileges",
    "quote_name",
]

#: What the runtime role gets on every table of the ``pgstream`` schema but ``alembic_version``.
RUNTIME_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
#: Privileges an upsert sink (aggregate, fold) needs: its stage table is created from it.
UPSERT_SINK_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")

Kind = Literal["database", "schema", "table", "sequence"]
_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")
_VERBS = {"SELECT": "SELECT from", "INSERT": "INSERT into", "DELETE": "DELETE from"}


@dataclass(frozen=True, slots=True)
class Need:
    """One privilege on one object. ``schema=None`` resolves a table through search_path;
    for a schema, ``name`` is the schema; for the current database, ``name`` is ignored."""

    kind: Kind
    schema: str | None
    name: str
    privilege: str
    purpose: str


@dataclass(frozen=True, slots=True)
class Missing:
    """A privilege the current role lacks (``schema`` resolved for tables and sequences)."""

    kind: Kind
    schema: str | None
    name: str
    privilege: str
    purpose: str

    @property
    def target(self) -> str:
        """The object as a GRANT names it: ``public.t``, ``SCHEMA s``, ``DATABASE d``."""
        if self.kind in ("table", "sequence"):
            qualified = quote_name(self.schema, self.name)
            return qualified if self.kind == "table" else f"SEQUENCE {qualified}"
        return f"{self.kind.upper()} {quote_name(None, self.name)}"

    @property
    def label(self) -> str:
        """The object for messages: ``table public.t``, ``schema pgstream``, ..."""
        if self.kind in ("table", "sequence"):
            return f"{self.kind} {quote_name(self.schema, self.name)}"
        return f"{self.kind} {quote_name(None, self.name)}"


def quote_name(schema: str | None, name: str) -> str:
    """``schema.name`` as SQL, quoting only the parts that need it."""

    def one(part: str) -> str:
        return part if _PLAIN.match(part) else '"' + part.replace('"', '""') + '"'

    return one(name) if schema is None else f"{one(schema)}.{one(name)}"


def app_needs(app: App) -> list[Need]:
    """What running ``app`` needs besides the ``pgstream`` schema's tables: USAGE on that
    schema, SELECT on table sources, the sink privileges, TEMPORARY for stage tables."""
    needs = [Need("schema", None, SCHEMA, "USAGE", "pgstream's checkpoint tables")]
    schemas: dict[str, str] = {}
    tables: list[Need] = []
    for name, source in app.sources.items():
        for read in source.tables_read():
            why = f"source of stream {name!r}"
            tables.append(Need("table", read.schema, read.relname, "SELECT", why))
            if read.schema is not None:
                schemas.setdefault(read.schema, why)
    kinds: dict[str, set[str]] = {}
    for spec in app.sinks:
        kinds.setdefault(spec.table, set()).add(spec.kind)
    for table, table_kinds in kinds.items():
        from pgstream.db.names import parse_table_name

        schema, rel = parse_table_name(table)
        upsert = bool(table_kinds - {"append"})
        why = "upsert sink" if upsert else "append sink"
        for privilege in UPSERT_SINK_PRIVILEGES if upsert else ("INSERT",):
            tables.append(Need("table", schema, rel, privilege, why))
        if schema is not None:
            schemas.setdefault(schema, why)
    needs += [Need("schema", None, s, "USAGE", why) for s, why in schemas.items()]
    needs += tables
    if any(spec.kind != "append" for spec in app.sinks):
        needs.append(Need("database", None, "", "TEMPORARY", "stage tables of upsert sinks"))
    return needs


def missing_privileges(
    conn: psycopg.Connection[Any], needs: Iterable[Need]
) -> tuple[str, list[Missing]]:
    """The current role and what it lacks of ``needs`` and of the ``pgstream`` schema's
    tables and sequences, in one query (catalog reads only: safe in any transaction)."""
    wanted = list(needs)
    rows = conn.execute(
        queries.MISSING_PRIVILEGES,
        {
            "kinds": [n.kind for n in wanted],
            "schemas": [n.schema for n in wanted],
            "names": [n.name for n in wanted],
            "privileges": [n.privilege for n in wanted],
            "purposes": [n.purpose for n in wanted],
            "own_purpose": "pgstream's checkpoint tables",
            "runtime_privileges": list(RUNTIME_TABLE_PRIVILEGES),
        },
    ).fetchall()
    role = str(rows[0][0]) if rows else ""
    missing = [Missing(r[1], r[2], r[3], r[4], r[5]) for r in rows if r[1] is not None]
    return role, missing


def check_privileges(app: App, conn: psycopg.Connection[Any]) -> None:
    """Raise one :class:`PrivilegeError` naming every grant ``app`` lacks, with the fix."""
    role, missing = missing_privileges(conn, app_needs(app))
    if missing:
        raise privilege_error(role, missing)


def privilege_error(role: str, missing: list[Missing]) -> PrivilegeError:
    """The error for ``missing``: what the role cannot do, and the GRANTs that fix it."""
    who = quote_name(None, role)
    problems: list[str] = []
    grants: list[str] = []
    own = [m for m in missing if m.kind in ("table", "sequence") and m.schema == SCHEMA]
    groups = _group([m for m in missing if m not in own])
    own_groups = _group(own)
    collapse = len(own_groups) > 2  # little or nothing granted: the schema-wide statements
    if not collapse:
        groups.update(own_groups)
    for (label, target, purpose), privileges in groups.items():
        problems.append(f"{_cannot(privileges, label)} ({purpose})")
        grants.append(f"GRANT {', '.join(privileges)} ON {target} TO {who}")
    if collapse:
        names = ", ".join(sorted({quote_name(m.schema, m.name) for m in own}))
        problems.append(f"lacks DML on pgstream's checkpoint tables ({names})")
        grants += [g.rstrip(";") for g in _schema_grants(who)[1:4]]
    if len(problems) == 1:
        message = f"permission denied: role {who} {problems[0]}"
    else:
        message = f"permission denied: role {who} lacks {len(problems)} grants: " + "; ".join(
            problems
        )
    own_schema = bool(own) or any(m.kind == "schema" and m.name == SCHEMA for m in missing)
    hint = (
        "run the GRANTs as the objects' owner"
        + (" (for pgstream.*: the role that ran `pgstream db upgrade`)" if own_schema else "")
        + f"; `pgstream db grant {who} --app MODULE:APP` prints every grant pgstream needs"
    )
    return PrivilegeError(f"{message}; fix: {'; '.join(grants)}", hint=hint)


def _group(missing: list[Missing]) -> dict[tuple[str, str, str], list[str]]:
    groups: dict[tuple[str, str, str], list[str]] = {}
    for m in missing:
        privileges = groups.setdefault((m.label, m.target, m.purpose), [])
        if m.privilege not in privileges:
            privileges.append(m.privilege)
    return groups


def _cannot(privileges: list[str], label: str) -> str:
    if privileges == ["USAGE"] and label.startswith("schema "):
        return f"cannot use {label}"
    if privileges == ["TEMPORARY"]:
        return f"cannot create temporary tables in {label}"
    if len(privileges) == 1:
        verb = _VERBS.get(privileges[0], privileges[0])
        return f"cannot {verb} {label}"
    return f"lacks {', '.join(privileges)} on {label}"


def grant_statements(
    role: str, app: App | None = None, conn: psycopg.Connection[Any] | None = None
) -> list[str]:
    """The GRANTs for runtime role ``role`` (``pgstream db grant``), as SQL lines.

    First the ``pgstream`` schema's part (run as its owner, the migration role), including
    ``ALTER DEFAULT PRIVILEGES`` so tables of later migrations are granted too; then, with
    ``app``, the grants on its source and sink tables (run as their owner). ``conn`` adds the
    sequences behind table sources' offset columns (optional: it lets pgstream tell a reset
    sequence from an empty table).
    """
    r = quote_name(None, role)
    lines = [
        f"-- as the owner of schema {SCHEMA} (the role that runs `pgstream db upgrade`):",
        *_schema_grants(r),
    ]
    if app is None:
        return lines
    lines.append(f"-- as the owner of the tables of app {app.name!r}:")
    for need in app_needs(app):
        if need.kind == "schema" and need.name != SCHEMA:
            lines.append(f"GRANT USAGE ON SCHEMA {quote_name(None, need.name)} TO {r};")
    lines += _table_grants(app, r)
    if conn is not None:
        lines += _sequence_grants(app, r, conn)
    if any(spec.kind != "append" for spec in app.sinks):
        lines.append(
            f"-- TEMPORARY is granted to PUBLIC by default; if revoked:\n"
            f"-- GRANT TEMPORARY ON DATABASE <database> TO {r};"
        )
    return lines


def _schema_grants(role: str) -> list[str]:
    """The runtime role's grants in the ``pgstream`` schema (run as its owner)."""
    dml = ", ".join(RUNTIME_TABLE_PRIVILEGES)
    return [
        f"GRANT USAGE ON SCHEMA {SCHEMA} TO {role};",
        f"GRANT {dml} ON ALL TABLES IN SCHEMA {SCHEMA} TO {role};",
        f"REVOKE INSERT, UPDATE, DELETE ON {SCHEMA}.alembic_version FROM {role};",
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {SCHEMA} TO {role};",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA} GRANT {dml} ON TABLES TO {role};",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA} GRANT USAGE ON SEQUENCES TO {role};",
    ]


def _table_grants(app: App, role: str) -> list[str]:
    """SELECT on sources; INSERT (+ SELECT for verify) on append sinks; upsert privileges."""
    from pgstream.db.names import parse_table_name

    privileges: dict[str, list[str]] = {}
    purposes: dict[str, list[str]] = {}

    def add(target: str, privs: Iterable[str], purpose: str) -> None:
        have = privileges.setdefault(target, [])
        have += [p for p in privs if p not in have]
        purposes.setdefault(target, []).append(purpose)

    for name, source in app.sources.items():
        for read in source.tables_read():
            add(quote_name(read.schema, read.relname), ["SELECT"], f"source of {name!r}")
    for spec in app.sinks:
        target = quote_name(*parse_table_name(spec.table))
        if spec.kind == "append":
            add(target, ["SELECT", "INSERT"], "append sink (SELECT: verify)")
        else:
            add(target, UPSERT_SINK_PRIVILEGES, "upsert sink")
    order = ["SELECT", "INSERT", "UPDATE"]
    return [
        f"GRANT {', '.join(sorted(p, key=order.index))} ON {t} TO {role};"
        f"  -- {', '.join(dict.fromkeys(purposes[t]))}"
        for t, p in privileges.items()
    ]


def _sequence_grants(app: App, role: str, conn: psycopg.Connection[Any]) -> list[str]:
    lines: list[str] = []
    reads = [read for source in app.sources.values() for read in source.tables_read()]
    for read in reads:
        row = conn.execute(
            queries.SERIAL_SEQUENCE,
            {"table": read.regclass_text(), "column": read.offset_column},
        ).fetchone()
        if row and row[0]:
            lines.append(
                f"GRANT SELECT ON SEQUENCE {row[0]} TO {role};"
                "  -- optional: detects a sequence reset behind the committed offset"
            )
    return lines


# -- the CLI's fallback for a stray SQLSTATE 42501 ------------------------------------------

_DENIED = re.compile(r"permission denied for (table|schema|sequence|database|view) (.+)$")
_TEMP = re.compile(r"permission denied to create temporary tables in database (.+)$")


def explain_denied(text: str) -> tuple[str, str]:
    """``(message, hint)`` for the server's "permission denied ..." text (SQLSTATE 42501)."""
    first = text.strip().splitlines()[0].strip() if text.strip() else "permission denied"
    temp = _TEMP.search(first)
    match = _DENIED.search(first)
    fix: str
    if temp:
        fix = f"GRANT TEMPORARY ON DATABASE {temp.group(1)} TO <role>"
    elif match and match.group(1) == "schema":
        fix = f"GRANT USAGE ON SCHEMA {match.group(2)} TO <role>"
    elif match and match.group(1) == "database":
        fix = (
            f"GRANT CREATE ON DATABASE {match.group(2)} TO <migration role> (pgstream db "
            f"upgrade creates schema {SCHEMA}), or pre-create it: CREATE SCHEMA {SCHEMA} "
            "AUTHORIZATION <migration role>"
        )
    elif match and match.group(1) == "sequence":
        fix = f"GRANT USAGE ON SEQUENCE {match.group(2)} TO <role>"
    elif match:
        fix = (
            f"GRANT the privilege on {match.group(2)} TO <role> (SELECT for a source; INSERT "
            "for an append sink; SELECT, INSERT, UPDATE for an upsert sink; SELECT on every "
            "sink for verify)"
        )
    else:
        fix = "grant the role pgstream connects as what README 'Permissions' lists"
    message = f"{first} (SQLSTATE 42501: the role pgstream connects as lacks a grant)"
    hint = (
        f"fix: {fix}; `pgstream db grant <role> --app MODULE:APP` prints every grant pgstream needs"
    )
    return message, hint

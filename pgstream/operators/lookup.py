"""Enrichment of records from a PostgreSQL table, read inside the batch transaction.

``stream.lookup("public.users", on="user_id", columns=["country"], missing="null")`` adds
``country`` to each record from the ``users`` row whose key column equals the record's
``user_id``. :class:`Lookup` is the step as the user declared it; :class:`BoundLookup` is its
per-pipeline runtime: it holds the rows read for the current batch and turns into ordinary
:class:`~pgstream.operators.steps.Filter`/:class:`~pgstream.operators.steps.Map` steps, so the
sink plans and kernels need not know about lookups.

The rows are read with ONE query per lookup and batch (``WHERE key = ANY(keys)``), by the
pipeline, inside the batch's checkpoint transaction: what a batch commits was computed from the
table as of that transaction. A batch replayed after a crash reads the table again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.rows import tuple_row

from pgstream.db.names import case_hint, display_name, parse_table_name
from pgstream.errors import ConfigError

if TYPE_CHECKING:
    from pgstream.operators.steps import Filter, Map, Step

Missing = Literal["null", "drop", "dead_letter"]
MISSING_MODES: tuple[str, ...] = ("null", "drop", "dead_letter")

_INTEGER = frozenset({"smallint", "integer", "bigint"})
_TEXT = frozenset({"text", "character varying", "character", "name", "uuid"})

_COLUMNS = """
SELECT a.attname,
       format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, NULL)
  FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
"""

# whether a unique index (or primary key) covers exactly this column
_UNIQUE = """
SELECT EXISTS (
  SELECT 1 FROM pg_index i JOIN pg_attribute a
         ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
   WHERE i.indrelid = %s AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL
     AND i.indexprs IS NULL AND a.attname = %s)
"""


class LookupMissingError(Exception):
    """A record's key has no row in the lookup table (``missing="dead_letter"``)."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """A ``stream.lookup(...)`` step: enrich records from the rows of ``table``."""

    table: str
    record_field: str  # the record's key field
    column: str  # the table's key column
    columns: tuple[str, ...]
    missing: Missing
    #: filled by :meth:`validate`: the key column's SQL type
    _types: dict[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @staticmethod
    def build(
        table: str,
        on: str | Mapping[str, str] | tuple[str, str],
        columns: Sequence[str],
        missing: str,
    ) -> Lookup:
        """Check the arguments of ``stream.lookup`` and build the step."""
        where = f"lookup({table!r})"
        if not isinstance(table, str) or not table.strip():
            raise ConfigError("lookup() needs a table name, e.g. lookup('public.users', ...)")
        parse_table_name(table)  # a clear error for a malformed name
        field_name, column = _on(on, where)
        if isinstance(columns, str) or not columns or not all(
            isinstance(c, str) and c for c in columns
        ):
            raise ConfigError(
                f"{where}: columns= must be a non-empty list of column names, got {columns!r}",
                hint="e.g. columns=['country']",
            )
        if missing not in MISSING_MODES:
            raise ConfigError(
                f"{where}: missing={missing!r} is not one of "
                + ", ".join(repr(m) for m in MISSING_MODES),
                hint='"null" sets the columns to None, "drop" filters the record out, '
                '"dead_letter" sets it aside with an error naming the key',
            )
        return Lookup(table, field_name, column, tuple(columns), missing)  # type: ignore[arg-type]

    @property
    def name(self) -> tuple[str | None, str]:
        """``(schema, table)`` as PostgreSQL resolves the name."""
        return parse_table_name(self.table)

    def describe(self) -> dict[str, Any]:
        """The step in the job's plan description (and fingerprint)."""
        return {
            "op": "lookup",
            "table": self.table,
            "on": {self.record_field: self.column},
            "columns": list(self.columns),
            "missing": self.missing,
        }

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Check the table, the key column (integer, text or uuid, unique) and ``columns``.

        Raises :class:`~pgstream.errors.ConfigError` naming the problem and the fix. Runs only
        catalog queries."""
        schema, relname = self.name
        cur = conn.cursor(row_factory=tuple_row)
        row = cur.execute(
            "SELECT to_regclass(%s)::oid", [display_name(schema, relname)]
        ).fetchone()
        relid = row[0] if row else None
        where = f"lookup table {self.table!r}"
        if relid is None:
            hint = case_hint(conn, schema, relname)
            raise ConfigError(
                f"{where} does not exist",
                hint=hint or "create it (e.g. in your migrations) or correct the name given "
                "to lookup()",
            )
        readable = cur.execute("SELECT has_table_privilege(%s::oid, 'SELECT')", [relid]).fetchone()
        if not (readable and readable[0]):
            raise ConfigError(
                f"{where}: this role may not read it",
                hint=f"GRANT SELECT ON {self.table} TO the role pgstream runs as",
            )
        types = {name: typ for name, typ in cur.execute(_COLUMNS, [relid]).fetchall()}
        wanted = [self.column, *self.columns]
        absent = [c for c in wanted if c not in types]
        if absent:
            raise ConfigError(
                f"{where} has no column(s) {', '.join(map(repr, absent))} "
                f"(its columns: {', '.join(sorted(types)) or 'none'})",
                hint="correct on= or columns= given to lookup()",
            )
        key_type = types[self.column]
        if key_type not in _INTEGER | _TEXT:
            raise ConfigError(
                f"{where}: key column {self.column!r} has type {key_type}",
                hint="look up by an integer, text or uuid column",
            )
        unique = cur.execute(_UNIQUE, [relid, self.column]).fetchone()
        if not (unique and unique[0]):
            raise ConfigError(
                f"{where}: key column {self.column!r} has no unique index, so a key may match "
                "several rows",
                hint=f"add a primary key or unique index on {self.column!r} (one row per key)",
            )
        self._types["key"] = key_type


def _on(on: str | Mapping[str, str] | tuple[str, str], where: str) -> tuple[str, str]:
    """``(record field, table column)`` from ``on=``."""
    if isinstance(on, str) and on:
        return on, on
    if isinstance(on, Mapping) and len(on) == 1:
        ((f, c),) = on.items()
        if isinstance(f, str) and isinstance(c, str) and f and c:
            return f, c
    if isinstance(on, tuple) and len(on) == 2 and all(isinstance(x, str) and x for x in on):
        return on[0], on[1]
    raise ConfigError(
        f"{where}: on={on!r} must name one key: a field (on='user_id'), or a record field and "
        "a table column (on={'user_id': 'id'} or on=('user_id', 'id'))",
        hint="keys of several columns are not supported yet; combine them into one column",
    )


_NO_ROW: Any = object()


class BoundLookup:
    """One pipeline's runtime of a :class:`Lookup`: the rows of the batch being committed."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        self.rows: dict[Any, tuple[Any, ...]] = {}
        #: statements run, for tests and metrics
        self.queries = 0
        self._uuid = False
        key = lookup.record_field
        cols = lookup.columns
        nulls = dict.fromkeys(cols)

        def key_of(record: Any) -> Any:
            if not isinstance(record, Mapping):
                raise LookupMissingError(
                    f"lookup in {lookup.table!r} needs dict records, got {_short(record)}"
                )
            try:
                return record[key]
            except KeyError:
                raise LookupMissingError(
                    f"lookup in {lookup.table!r}: record has no field {key!r} "
                    f"(record: {_short(record)})"
                ) from None

        def row_of(record: Any) -> Any:
            key = key_of(record)
            if self._uuid and isinstance(key, str):
                key = key.lower()  # the rows hold uuid::text, which is lower case
            return self.rows.get(key, _NO_ROW)

        def enrich(record: Any) -> Any:
            row = row_of(record)
            if row is _NO_ROW:
                if lookup.missing == "dead_letter":
                    raise LookupMissingError(
                        f"lookup in {lookup.table!r}: no row with {lookup.column} = "
                        f"{key_of(record)!r}"
                    )
                return {**record, **nulls}
            return {**record, **dict(zip(cols, row))}

        self.key_of = key_of
        self._has_row = lambda record: row_of(record) is not _NO_ROW
        self._enrich = enrich

    def steps(self) -> tuple[Filter | Map, ...]:
        """The ordinary steps that stand for this lookup in the pipeline."""
        from pgstream.operators.steps import Filter, Map  # steps imports this module

        if self.lookup.missing == "drop":
            return Filter(self._has_row), Map(self._enrich)
        return (Map(self._enrich),)

    def fetch(self, cur: psycopg.Cursor[Any], keys: set[Any]) -> None:
        """Read the rows of ``keys`` (one statement), replacing the previous batch's rows."""
        lk = self.lookup
        key_type = lk._types.get("key")
        if key_type is None:
            lk.validate(cur.connection)
            key_type = lk._types["key"]
        wanted: list[Any]
        if key_type in _INTEGER:
            wanted = [k for k in keys if isinstance(k, int) and not isinstance(k, bool)]
        else:
            wanted = [k for k in keys if isinstance(k, str)]
        self.rows = {}
        if not wanted:
            return
        schema, relname = lk.name
        table = sql.Identifier(relname) if schema is None else sql.Identifier(schema, relname)
        query = sql.SQL("SELECT {key}::{cast}, {cols} FROM {table} WHERE {key} = ANY(%s)").format(
            key=sql.Identifier(lk.column),
            cast=sql.SQL("bigint" if key_type in _INTEGER else "text"),
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in lk.columns),
            table=table,
        )
        self.queries += 1
        param: Any = wanted if key_type in _INTEGER else _text_param(key_type, wanted)
        self._uuid = key_type == "uuid"
        if not param:
            return
        try:
            with cur.connection.cursor(row_factory=tuple_row) as c:
                for row in c.execute(query, [param]):
                    self.rows[row[0]] = tuple(row[1:])
        except (
            psycopg.errors.UndefinedTable,
            psycopg.errors.UndefinedColumn,
            psycopg.errors.InsufficientPrivilege,
        ) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"lookup table {lk.table!r} changed since the job started and cannot be read: "
                f"{first}; the batch was not committed",
                hint="restore the table, its columns and the SELECT grant, or change the "
                "lookup() in the app, then run again",
            ) from exc


def _text_param(key_type: str, keys: list[Any]) -> Any:
    """Text keys typed as the column (``uuid``, ``text``...) for ``= ANY(%s)``."""
    if key_type == "uuid":
        out: list[uuid.UUID] = []
        for k in keys:
            try:
                out.append(uuid.UUID(k))
            except ValueError:
                continue
        return out
    return keys


def _short(record: Any) -> str:
    text = repr(record)
    return text if len(text) <= 200 else text[:197] + "..."


class Lookups:
    """The lookups of one pipeline: binds them into its steps, reads their rows per batch.

    Identical lookups after identical steps (one stream feeding several sinks) share one
    :class:`BoundLookup`, hence one query. A lookup after another runs its query after the
    other's rows are read, since its keys may depend on them.
    """

    def __init__(self) -> None:
        self._bound: dict[tuple[Any, ...], BoundLookup] = {}
        #: (depth, key collector, bound lookup), in query order
        self._collectors: list[tuple[int, Any, BoundLookup]] = []

    def __bool__(self) -> bool:
        return bool(self._bound)

    @property
    def bound(self) -> list[BoundLookup]:
        """The bound lookups, one per query of a batch."""
        return list(self._bound.values())

    def bind(self, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        """``steps`` with every :class:`Lookup` replaced by its bound steps."""
        from pgstream.operators.steps import compile_chain

        out: list[Step] = []
        depth = 0
        for i, step in enumerate(steps):
            if not isinstance(step, Lookup):
                out.append(step)
                continue
            ident = steps[: i + 1]
            bound = self._bound.get(ident)
            if bound is None:
                bound = self._bound[ident] = BoundLookup(step)
                prefix = compile_chain(tuple(out))
                self._collectors.append((depth, prefix, bound))
                self._collectors.sort(key=lambda c: c[0])
            out.extend(bound.steps())
            depth += 1
        return tuple(out)

    def fetch(self, cur: psycopg.Cursor[Any], values: Sequence[Any]) -> None:
        """Read the rows every lookup needs for the records ``values`` (one query each).

        Records whose steps before a lookup fail are left out here: evaluating them again
        sets them aside with the error."""
        for _depth, prefix, bound in self._collectors:
            keys: set[Any] = set()
            key_of = bound.key_of
            for value in values:
                try:
                    for item in prefix(value):
                        keys.add(key_of(item))
                except Exception:  # the evaluation sets it aside
                    continue
            bound.fetch(cur, keys)


def lookups_in(steps: Sequence[Any]) -> list[Lookup]:
    """The lookups among ``steps``."""
    return [s for s in steps if isinstance(s, Lookup)]

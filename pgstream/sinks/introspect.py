"""Reading a sink table's shape from the catalog, for validation and typed writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgstream.db.names import case_hint, display_name, parse_table_name
from pgstream.errors import SinkSchemaError

# The table, its columns and its unique column sets in one round trip (no row: no table).
_LOAD = """
SELECT c.oid, n.nspname, c.relname,
       (SELECT COALESCE(json_agg(json_build_array(
                   a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   a.atthasdef OR a.attidentity <> '', a.attgenerated <> '') ORDER BY a.attnum),
               '[]')
          FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       (SELECT COALESCE(json_agg(u.cols), '[]')
          FROM (SELECT array_agg(a.attname ORDER BY a.attname) AS cols
                  FROM pg_index i
                  JOIN LATERAL unnest(i.indkey) AS k(attnum) ON true
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisunique AND i.indpred IS NULL
                   AND i.indexprs IS NULL
                 GROUP BY i.indexrelid) AS u) AS unique_keys
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass(CASE WHEN %(schema)s::text IS NULL THEN quote_ident(%(name)s)
                                ELSE quote_ident(%(schema)s) || '.' || quote_ident(%(name)s) END)
"""


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a sink table."""

    name: str
    type: str
    not_null: bool
    has_default: bool
    generated: bool


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A sink table: its qualified name, columns and unique column sets."""

    schema: str
    name: str
    columns: dict[str, Column]
    unique_keys: tuple[frozenset[str], ...]

    @property
    def ident(self) -> sql.Identifier:
        """The quoted, schema-qualified identifier."""
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        """``schema.table`` for messages."""
        return f"{self.schema}.{self.name}"

    def require_columns(self, names: list[str] | tuple[str, ...], why: str) -> None:
        """Raise naming every column of ``names`` that the table lacks."""
        missing = [n for n in names if n not in self.columns]
        if missing:
            cols = ", ".join(missing)
            raise SinkSchemaError(
                f"sink table {self.label} has no column {cols} ({why})",
                hint="add it in your Alembic migration (see pgstream.schema) and upgrade",
            )

    def require_unique(self, names: tuple[str, ...], why: str) -> None:
        """Raise unless a primary key or unique index covers exactly ``names``."""
        if frozenset(names) not in self.unique_keys:
            cols = ", ".join(names)
            raise SinkSchemaError(
                f"sink table {self.label} has no unique index on ({cols}) ({why})",
                hint=f"add PRIMARY KEY ({cols}) or a UNIQUE index on exactly these columns",
            )


def load_table(conn: psycopg.Connection[Any], qualified: str) -> TableInfo:
    """Look up ``qualified`` (resolved like SQL: see :mod:`pgstream.db.names`) or raise naming
    it, with the quoted spelling when only its case differs from an existing table."""
    schema, name = parse_table_name(qualified)
    with conn.cursor() as cur:
        row = cur.execute(_LOAD, {"schema": schema, "name": name}).fetchone()
        if row is None:
            looked = display_name(schema, name)
            also = f" (looked for {looked})" if looked != qualified.strip() else ""
            raise SinkSchemaError(
                f"sink table {qualified} does not exist{also}",
                hint=case_hint(conn, schema, name)
                or "create it in your own Alembic migration (pgstream.schema has helpers)",
            )
        _oid, nsp, rel, columns, unique_keys = row
    cols = {r[0]: Column(r[0], r[1], r[2], r[3], r[4]) for r in columns}
    keys = tuple(frozenset(k) for k in unique_keys)
    return TableInfo(nsp, rel, cols, keys)

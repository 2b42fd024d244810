"""Upsert sinks: keyed aggregates merged as deltas, and fold results overwritten by key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgstream.errors import SinkSchemaError
from pgstream.operators.aggregates import Aggregate
from pgstream.sinks.introspect import TableInfo, load_table

Row = tuple[Any, ...]


class UpsertSink:
    """Writes one row per touched key: staged with ``COPY`` into a session temp table, then
    ``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE`` in key order (a stable lock order, so
    concurrent partitions updating the same keys do not deadlock)."""

    kind = "upsert"

    def __init__(self, table: str, key_columns: tuple[str, ...], stage_name: str) -> None:
        self.table_name = table
        self.key_columns = key_columns
        self.stage_name = stage_name
        self._info: TableInfo | None = None

    @property
    def info(self) -> TableInfo:
        """The bound table (after :meth:`bind`)."""
        if self._info is None:
            raise RuntimeError(f"sink {self.table_name} is not bound")
        return self._info

    def bind(self, conn: psycopg.Connection[Any]) -> None:
        """Look the table up and validate its key and value columns."""
        info = load_table(conn, self.table_name)
        info.require_columns(self.key_columns, "they hold the key")
        info.require_unique(self.key_columns, "rows are upserted by key")
        info.require_columns(self.value_columns(), "one column per aggregate")
        self._info = info

    def value_columns(self) -> tuple[str, ...]:
        """Non-key columns written by every row (empty when the shape varies per batch)."""
        return ()

    def set_clauses(self, columns: tuple[str, ...]) -> list[sql.Composable]:
        """``SET`` clauses for the ``ON CONFLICT DO UPDATE`` of ``columns``."""
        return [sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in columns]

    def write(
        self, cur: psycopg.Cursor[Any], columns: tuple[str, ...], rows: Sequence[Row]
    ) -> None:
        """Upsert ``rows`` (key columns first, then ``columns``)."""
        if not rows:
            return
        info = self.info
        missing = [c for c in columns if c not in info.columns]
        if missing:
            raise SinkSchemaError(
                f"sink table {info.label} has no column {', '.join(missing)}",
                hint="add it in a migration",
            )
        all_cols = (*self.key_columns, *columns)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in all_cols)
        stage = sql.Identifier(f"{self.stage_name}_{abs(hash(all_cols)) % 10**8}")
        cur.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                "SELECT {cols} FROM {table} WITH NO DATA"
            ).format(stage=stage, cols=cols, table=info.ident)
        )
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(stage, cols)) as copy:
            for row in rows:
                copy.write_row(row)
        target = sql.Identifier("t")
        keys = sql.SQL(", ").join(sql.Identifier(c) for c in self.key_columns)
        sets = self.set_clauses(columns) if columns else []
        action = (
            sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(sets) if sets else sql.SQL("DO NOTHING")
        )
        cur.execute(
            sql.SQL(
                "INSERT INTO {table} AS {t} ({cols}) SELECT {cols} FROM {stage} ORDER BY {keys} "
                "ON CONFLICT ({keys}) "
            ).format(table=info.ident, t=target, cols=cols, stage=stage, keys=keys)
            + action
        )


class AggregateSink(UpsertSink):
    """Keyed aggregates: each batch's per-key deltas are merged in SQL."""

    def __init__(
        self, table: str, key_columns: tuple[str, ...], aggregates: Sequence[Aggregate], stage: str
    ) -> None:
        super().__init__(table, key_columns, stage)
        self.aggregates = tuple(aggregates)

    def value_columns(self) -> tuple[str, ...]:
        return tuple(c for a in self.aggregates for c in a.columns())

    def set_clauses(self, columns: tuple[str, ...]) -> list[sql.Composable]:
        target = sql.Identifier("t")
        return [clause for a in self.aggregates for clause in a.merge_sql(target)]

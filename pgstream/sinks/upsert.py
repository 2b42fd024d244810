"""Upsert sinks: keyed aggregates merged as deltas, and fold results overwritten by key."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgstream.operators.aggregates import Aggregate
from pgstream.sinks.base import SinkTable
from pgstream.sinks.introspect import TableInfo

Row = tuple[Any, ...]


class UpsertSink(SinkTable):
    """Writes one row per touched key: staged with ``COPY`` into a session temp table, then
    ``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE`` in key order (a stable lock order, so
    concurrent partitions updating the same keys do not deadlock)."""

    kind = "upsert"

    def __init__(self, table: str, key_columns: tuple[str, ...], stage_name: str) -> None:
        super().__init__(table)
        self.key_columns = key_columns
        self.stage_name = stage_name
        #: the stage tables this sink created in its session (see :meth:`clear_stages`)
        self.stages: set[str] = set()

    def validate(self, info: TableInfo) -> None:
        """The key columns, a unique index on exactly them, and the value columns must exist."""
        info.require_columns(self.key_columns, "they hold the key")
        info.require_unique(self.key_columns, "rows are upserted by key")
        info.require_columns(self.value_columns(), "one column per aggregate")

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
        self.check_columns(columns)
        all_cols = (*self.key_columns, *columns)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in all_cols)
        stage = self._stage(cur, all_cols, all_cols, rows)
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

    def delete(self, cur: psycopg.Cursor[Any], keys: Sequence[Row]) -> None:
        """Delete the rows of ``keys`` (key column values), staged with ``COPY`` like
        :meth:`write` (a session window's merged or moved sessions)."""
        if not keys:
            return
        info = self.info
        stage = self._stage(cur, self.key_columns, ("delete", *self.key_columns), keys)
        match = sql.SQL(" AND ").join(
            sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(c)) for c in self.key_columns
        )
        cur.execute(
            sql.SQL("DELETE FROM {table} AS t USING {stage} AS s WHERE {match}").format(
                table=info.ident, stage=stage, match=match
            )
        )

    def _stage(
        self,
        cur: psycopg.Cursor[Any],
        columns: tuple[str, ...],
        shape: tuple[str, ...],
        rows: Sequence[Row],
    ) -> sql.Identifier:
        """COPY ``rows`` (values of ``columns``) into this session's stage table of ``shape``
        (created on first use, emptied at COMMIT) and return its name."""
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        crc = zlib.crc32("\0".join(shape).encode())
        stage_table = f"{self.stage_name}_{crc:08x}"
        stage = sql.Identifier(stage_table)
        self.stages.add(stage_table)
        cur.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                "SELECT {cols} FROM {table} WITH NO DATA"
            ).format(stage=stage, cols=cols, table=self.info.ident)
        )
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(stage, cols)) as copy:
            for row in rows:
                copy.write_row(row)
        return stage

    def clear_stages(self, cur: psycopg.Cursor[Any]) -> None:
        """Empty the stage tables now. A batch writes each sink once per transaction, and
        they empty at COMMIT; a transaction that writes a sink again (``pgstream dlq
        redrive``, one record at a time) must empty them in between."""
        if not self.stages:
            return
        existing = cur.execute(  # a rolled-back savepoint may have taken one's creation away
            "SELECT relname FROM pg_class WHERE relnamespace = pg_my_temp_schema() "
            "AND relname = ANY(%s) ORDER BY 1",
            [sorted(self.stages)],
        ).fetchall()
        for (name,) in existing:
            cur.execute(sql.SQL("DELETE FROM pg_temp.{}").format(sql.Identifier(name)))


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

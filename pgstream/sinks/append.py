"""Append sink: one row per operator output, keyed by where it came from.

This module owns the bookkeeping layout of an append row: the output's values, then
:data:`META_COLUMNS` (:func:`make_row` builds a row, :func:`split_row` takes it apart).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgstream.errors import SinkSchemaError
from pgstream.sinks.base import SinkTable
from pgstream.sinks.introspect import TableInfo

META_COLUMNS = ("_source", "_partition", "_offset", "_seq")
#: the recommended column order of the unique index over META_COLUMNS (any order is accepted):
#: integers first make smaller entries and cheaper comparisons (see pgstream.schema)
POSITION_INDEX = ("_offset", "_seq", "_source", "_partition")

Row = tuple[Any, ...]
#: where an output came from: ``(_source, _partition, _offset, _seq)``
Position = tuple[str, str, int, int]


def make_row(values: Iterable[Any], source: str, partition: str, offset: int, seq: int) -> Row:
    """The row of one output: its ``values``, then the :data:`META_COLUMNS` values."""
    return (*values, source, partition, offset, seq)


def split_row(row: Row) -> tuple[Row, Position]:
    """A row of :func:`make_row` as its output values and its position."""
    n = len(row) - len(META_COLUMNS)
    return row[:n], (row[n], row[n + 1], row[n + 2], row[n + 3])


class DuplicateOutputError(Exception):
    """An append sink already holds an output of this batch (offsets were rewound)."""


class AppendSink(SinkTable):
    """Writes outputs with ``COPY``; each row carries ``(_source, _partition, _offset, _seq)``.

    The unique index on those four columns makes a second write of the same output
    impossible. The batch's compare-and-set means it is never attempted; if it ever is
    (a rewound offset without retraction), the batch falls back to
    ``INSERT ... ON CONFLICT DO NOTHING`` so replays stay idempotent.
    """

    kind = "append"

    def validate(self, info: TableInfo) -> None:
        """The idempotency columns and their unique index must exist."""
        info.require_columns(META_COLUMNS, "append sinks record where each row came from")
        info.require_unique(META_COLUMNS, "it makes each output idempotent")

    def check_columns(self, columns: tuple[str, ...]) -> None:
        """Outputs may name only table columns, and never the idempotency columns."""
        if columns not in self._checked:
            bad = [c for c in columns if c in META_COLUMNS]
            if bad:
                raise SinkSchemaError(f"operator output may not set reserved column(s) {bad}")
        super().check_columns(columns)

    def write(self, cur: psycopg.Cursor[Any], groups: dict[tuple[str, ...], list[Row]]) -> None:
        """COPY every group of rows (rows end with the four meta columns)."""
        for columns, rows in groups.items():
            self.check_columns(columns)
            stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
                self.info.ident, _idents((*columns, *META_COLUMNS))
            )
            with cur.copy(stmt) as copy:
                write_row = copy.write_row
                for row in rows:
                    write_row(row)

    def insert_ignoring_duplicates(
        self, cur: psycopg.Cursor[Any], columns: tuple[str, ...], rows: Sequence[Row]
    ) -> None:
        """The slow, replay-tolerant path: ``INSERT ... ON CONFLICT DO NOTHING``."""
        self.check_columns(columns)
        all_cols = (*columns, *META_COLUMNS)
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING").format(
            self.info.ident,
            _idents(all_cols),
            sql.SQL(", ").join(sql.Placeholder() * len(all_cols)),
            _idents(META_COLUMNS),
        )
        cur.executemany(stmt, rows)


def _idents(names: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)

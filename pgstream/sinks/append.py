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
from pgstream.sinks.copyformat import binary_types
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


#: the most groups of one write in the binary format: each runs in a savepoint, and a
#: transaction holding more than 64 subtransaction ids slows every snapshot on the server
BINARY_GROUPS = 8
#: what makes a binary COPY fall back to text: a value psycopg cannot dump in the column's
#: binary form (beyond bigint, ...) or one the table refuses (the text COPY then raises the
#: canonical error, or writes the value as text always did)
_REFUSED = (
    psycopg.errors.DataError,
    psycopg.errors.IntegrityError,
    OverflowError,
    TypeError,
    ValueError,
)


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
        """COPY every group of rows (rows end with the four meta columns): in the binary
        format where it stores what the text format would (:mod:`pgstream.sinks.copyformat`),
        for at most :data:`BINARY_GROUPS` groups; a binary ``COPY`` that fails is undone (a
        savepoint) and the group written in text, so a rejection is always the text
        format's."""
        binary_left = BINARY_GROUPS
        for columns, rows in groups.items():
            self.check_columns(columns)
            names = (*columns, *META_COLUMNS)
            types = None
            if binary_left:
                declared = [self.info.columns[c].type for c in names]
                types = binary_types(declared, rows, len(columns))
            if types is not None:
                binary_left -= 1
                if self._copy_binary(cur, names, types, rows):
                    continue
            with cur.copy(self._copy_stmt(names)) as copy:
                write_row = copy.write_row
                for row in rows:
                    write_row(row)

    def _copy_stmt(self, names: tuple[str, ...], binary: bool = False) -> sql.Composed:
        fmt = sql.SQL(" (FORMAT BINARY)" if binary else "")
        return sql.SQL("COPY {} ({}) FROM STDIN{}").format(self.info.ident, _idents(names), fmt)

    def _copy_binary(
        self, cur: psycopg.Cursor[Any], names: tuple[str, ...], types: list[str], rows: list[Row]
    ) -> bool:
        """COPY ``rows`` in the binary format under a savepoint: False (and nothing written)
        when a value is refused, by psycopg or by the table."""
        cur.execute("SAVEPOINT pgstream_copy")
        try:
            with cur.copy(self._copy_stmt(names, binary=True)) as copy:
                copy.set_types(types)
                write_row = copy.write_row
                for row in rows:
                    write_row(row)
        except _REFUSED:
            cur.execute("ROLLBACK TO SAVEPOINT pgstream_copy")
            cur.execute("RELEASE SAVEPOINT pgstream_copy")
            return False
        cur.execute("RELEASE SAVEPOINT pgstream_copy")
        return True

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

"""What every sink shares: a user-owned table, looked up and validated at start."""

from __future__ import annotations

from typing import Any

import psycopg

from pgstream.errors import SinkSchemaError
from pgstream.sinks.introspect import TableInfo, load_table


class SinkTable:
    """A sink bound to its table: :meth:`bind` looks it up and runs :meth:`validate`."""

    kind = "sink"

    def __init__(self, table: str) -> None:
        self.table_name = table
        self._info: TableInfo | None = None
        self._checked: set[tuple[str, ...]] = set()

    @property
    def info(self) -> TableInfo:
        """The bound table (after :meth:`bind`)."""
        if self._info is None:
            raise RuntimeError(f"sink {self.table_name} is not bound")
        return self._info

    def bind(self, conn: psycopg.Connection[Any]) -> None:
        """Look the table up and check it has what this sink writes."""
        info = load_table(conn, self.table_name)
        self.validate(info)
        self._info = info
        self._checked.clear()

    def validate(self, info: TableInfo) -> None:
        """Raise :class:`SinkSchemaError` naming what ``info`` lacks."""

    def check_columns(self, columns: tuple[str, ...]) -> None:
        """Raise if records name columns the table lacks (checked once per shape)."""
        if columns in self._checked:
            return
        info = self.info
        missing = [c for c in columns if c not in info.columns]
        if missing:
            raise SinkSchemaError(
                f"operator output has field(s) {', '.join(missing)} but sink table "
                f"{info.label} has no such column",
                hint="add the column in a migration, or drop the field in your operator",
            )
        self._checked.add(columns)

"""When an append sink's ``COPY`` may use the binary format: it must store what text would.

In the text format PostgreSQL parses every value and psycopg escapes every string; in the
binary format each value travels as its column type's own representation, which costs psycopg
less than half as much per row (and the server less too). The two formats store the same
values only where a value's Python type is the one the column's binary form expects, so a group
of rows is written in binary only when every column of the table has a type of
:data:`BINARY_TYPES` and every value of an output column is ``None`` or exactly of the column's
Python type (``type(v) is int``: a ``bool`` in a bigint column or a ``str`` subclass keeps the
text format, which may write them differently), within range where the binary form would wrap
(``smallint``, ``integer``). The bookkeeping columns hold what
:func:`~pgstream.sinks.append.make_row` puts there (``str``, ``str``, ``int``, and an ``int`` far
below 2**31), so only their column types are checked.

A value the binary format still refuses (an ``int`` beyond bigint, a NUL in a string) fails
the binary ``COPY``; the sink then writes the group again in text (see
:meth:`AppendSink.write <pgstream.sinks.append.AppendSink.write>`), so any rejection is the
text format's own, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

#: column type (as ``format_type`` spells it) -> (psycopg type name, the values' Python type,
#: the range the binary form holds or ``None`` when psycopg refuses what it cannot hold)
BINARY_TYPES: dict[str, tuple[str, type, tuple[int, int] | None]] = {
    "bigint": ("int8", int, None),
    "integer": ("int4", int, (-(2**31), 2**31 - 1)),
    "smallint": ("int2", int, (-(2**15), 2**15 - 1)),
    "text": ("text", str, None),
    "character varying": ("varchar", str, None),
    "double precision": ("float8", float, None),
    "boolean": ("bool", bool, None),
}

#: the least rows for which a group is worth a binary COPY (and the savepoint it runs under)
MIN_ROWS = 1_000


def column_type(declared: str) -> tuple[str, type, tuple[int, int] | None] | None:
    """The binary form of a column declared ``declared`` (``character varying(20)`` is a
    varchar), or ``None`` when its values keep the text format."""
    base = declared.split("(", 1)[0] if declared.startswith("character varying") else declared
    return BINARY_TYPES.get(base)


def binary_types(
    declared: Sequence[str], rows: Sequence[tuple[Any, ...]], checked: int
) -> list[str] | None:
    """The psycopg type names for a binary ``COPY`` of ``rows`` into columns declared
    ``declared``, or ``None`` when the group keeps the text format: a column type without a
    binary form here, fewer than :data:`MIN_ROWS` rows, or a value of one of the first
    ``checked`` columns (the operator's outputs) not exactly of its column's Python type or out
    of its range."""
    if len(rows) < MIN_ROWS:
        return None
    forms = [column_type(d) for d in declared]
    names: list[str] = []
    for form in forms:
        if form is None:
            return None
        names.append(form[0])
    for j in range(checked):
        form = forms[j]
        assert form is not None
        if not _fits(rows, j, form[1], form[2]):
            return None
    return names


def _fits(
    rows: Sequence[tuple[Any, ...]], j: int, kind: type, bounds: tuple[int, int] | None
) -> bool:
    """Every value of column ``j`` is ``None`` or exactly of type ``kind`` (within
    ``bounds``)."""
    get = itemgetter(j)
    kinds = set(map(type, map(get, rows)))
    nulls = type(None) in kinds
    kinds.discard(type(None))
    if not kinds <= {kind}:
        return False
    if bounds is None or not kinds:
        return True
    values = [v for v in map(get, rows) if v is not None] if nulls else list(map(get, rows))
    low: int = min(values)
    high: int = max(values)
    return bounds[0] <= low and high <= bounds[1]

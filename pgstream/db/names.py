"""Table names as users write them, resolved the way PostgreSQL resolves them.

This module owns the rule for every table name a user gives pgstream (``TableSource``,
``to_table``): the same as SQL and ``'...'::regclass``.

* An unquoted part folds to lower case: ``"Orders"`` and ``"orders"`` both name ``orders``.
* A double-quoted part is kept exactly: ``'"Orders"'``, ``'public."Order Lines"'``; ``""``
  inside quotes is one ``"``, and a quoted part may contain dots.
* Whitespace around a part is ignored. An unquoted part that contains whitespace is refused
  (PostgreSQL refuses it too) with a hint showing the quoted spelling, so an old literal name
  such as ``my schema.Order Lines`` never silently resolves to a different table.

When the folded name is missing but a table of the same name in another case exists,
:func:`case_hint` gives the quoted spelling to use.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import tuple_row

from pgstream.errors import ConfigError

_UPPER_TO_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz_")
_NEXT = _FIRST | frozenset("0123456789$")


def _plain(part: str) -> bool:
    """Whether ``part`` is an identifier SQL takes unquoted once folded (letters, ``_`` or
    any non-ASCII character first, then also digits and ``$``)."""
    return (
        part != ""
        and (part[0] in _FIRST or part[0] >= "\x80")
        and all(c in _NEXT or c >= "\x80" for c in part[1:])
    )

# relations whose name equals the wanted one but for case, where the wanted one would be found
_SAME_BUT_CASE = """
SELECT n.nspname, c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND lower(c.relname) = lower(%(name)s)
   AND CASE WHEN %(schema)s::text IS NULL THEN n.nspname = ANY (current_schemas(false))
            ELSE lower(n.nspname) = lower(%(schema)s) END
   AND NOT (c.relname = %(name)s AND n.nspname = COALESCE(%(schema)s, n.nspname))
 ORDER BY n.nspname = %(schema)s DESC, n.nspname, c.relname
 LIMIT 3
"""


def fold_case(identifier: str) -> str:
    """PostgreSQL's folding of an unquoted identifier: ASCII letters to lower case only."""
    return identifier.translate(_UPPER_TO_LOWER)


def parse_table_name(name: str) -> tuple[str | None, str]:
    """Split ``"schema.table"`` or ``"table"`` into ``(schema, table)``, as PostgreSQL would.

    Unquoted parts fold to lower case, double-quoted parts keep their case:
    ``parse_table_name('Sales."Order Lines"') == ("sales", "Order Lines")``.
    """
    parts: list[str] = []
    i, n = 0, len(name)
    while True:
        while i < n and name[i].isspace():
            i += 1
        if i < n and name[i] == '"':
            part, i = _quoted(name, i)
        else:
            j = i
            while i < n and name[i] not in '."' and not name[i].isspace():
                i += 1
            part = fold_case(name[j:i])
        end = i
        while i < n and name[i].isspace():
            i += 1
        parts.append(part)
        if i >= n:
            break
        if name[i] != ".":
            raise _syntax_error(name, spaced=i > end)
        i += 1
    if len(parts) > 2 or not all(parts):
        raise _syntax_error(name)
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], parts[1]


def _quoted(name: str, i: int) -> tuple[str, int]:
    """The quoted part starting at ``name[i] == '"'`` and the index after its closing quote."""
    out: list[str] = []
    j, n = i + 1, len(name)
    while True:
        if j >= n:
            raise ConfigError(
                f"table name {name!r} has an unterminated double quote",
                hint="close it: 'public.\"Order Lines\"'",
            )
        if name[j] == '"':
            if j + 1 < n and name[j + 1] == '"':
                out.append('"')
                j += 2
                continue
            return "".join(out), j + 1
        out.append(name[j])
        j += 1


def _syntax_error(name: str, *, spaced: bool = False) -> ConfigError:
    if spaced:
        return ConfigError(
            f"table name {name!r} has a space outside double quotes",
            hint="unquoted names cannot contain spaces and fold to lower case, like in SQL; "
            f"double-quote each part to keep it exactly: {_suggest_quoted(name)!r}",
        )
    return ConfigError(
        f"table name {name!r} is not 'table' or 'schema.table'",
        hint="double-quote a part that contains a dot, a space or capitals to keep it "
        "exactly: 'public.\"Order Lines\"'",
    )


def _suggest_quoted(name: str) -> str:
    parts = name.replace('"', "").strip().split(".")
    if len(parts) > 2:
        parts = [".".join(parts[:-1]), parts[-1]]
    return ".".join(quote_part(p.strip()) for p in parts)


def quote_part(part: str) -> str:
    """``part`` as the user would write it: bare when it folds to itself, else double-quoted."""
    if _plain(part):
        return part
    return '"' + part.replace('"', '""') + '"'


def display_name(schema: str | None, name: str) -> str:
    """The name the user would write for ``(schema, name)`` (quoted where needed)."""
    return quote_part(name) if schema is None else f"{quote_part(schema)}.{quote_part(name)}"


def case_hint(conn: psycopg.Connection[Any], schema: str | None, name: str) -> str | None:
    """When ``(schema, name)`` is missing but a table differing only in case exists: a hint
    naming it and its quoted spelling; otherwise ``None``. Runs one catalog query."""
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(_SAME_BUT_CASE, {"schema": schema, "name": name}).fetchall()
    if not rows:
        return None
    found = [display_name(nsp if schema is not None else None, rel) for nsp, rel in rows]
    spelled = " or ".join(repr(f) for f in found)
    return (
        f"a table named {spelled} exists: unquoted names fold to lower case like in SQL, so "
        f"write the name with double quotes to keep its case, e.g. {found[0]!r}"
    )

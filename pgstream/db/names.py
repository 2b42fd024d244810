"""Table names as users write them: ``"table"`` or ``"schema.table"``, taken literally."""

from __future__ import annotations

from pgstream.errors import ConfigError


def parse_table_name(name: str) -> tuple[str | None, str]:
    """Split ``"schema.table"`` or ``"table"`` into ``(schema, table)``.

    Names are taken literally (case-sensitive, spaces allowed, no SQL quoting needed):
    ``"my schema.Order Lines"`` is the table ``Order Lines`` in the schema ``my schema``.
    Double quotes are only needed to put a dot inside a name: ``'"odd.schema".t'``.
    """
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(name)
    while i < n:
        c = name[i]
        if c == '"':
            j = i + 1
            while True:
                if j >= n:
                    raise ConfigError(f"table name {name!r} has an unterminated double quote")
                if name[j] == '"':
                    if j + 1 < n and name[j + 1] == '"':
                        cur.append('"')
                        j += 2
                        continue
                    break
                cur.append(name[j])
                j += 1
            i = j + 1
        elif c == ".":
            parts.append("".join(cur))
            cur = []
            i += 1
        else:
            cur.append(c)
            i += 1
    parts.append("".join(cur))
    if len(parts) > 2 or not all(parts):
        raise ConfigError(
            f"table name {name!r} is not 'table' or 'schema.table'",
            hint="quote a name that itself contains a dot: '\"odd.name\".orders'",
        )
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], parts[1]

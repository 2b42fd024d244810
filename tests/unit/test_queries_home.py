"""SQL against the ``pgstream`` schema lives in :mod:`pgstream.db.queries` (one file per schema
change): no other module of the package may name one of its tables in a statement."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import pgstream
from pgstream.db.tables import SCHEMA, metadata

PACKAGE = Path(pgstream.__file__).resolve().parent

#: modules that may still hold such statements, each with the reason. Every entry must still
#: have one (a stale entry fails), so the list only shrinks.
ALLOWED: dict[str, str] = {}

_TABLES = sorted(t.name for t in metadata.tables.values() if t.schema == SCHEMA)
#: a statement naming a pgstream table, or an identifier built for one with psycopg.sql
_STATEMENT = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE|COPY)\s+" + SCHEMA + r"\.(?:" + "|".join(_TABLES) + r")\b"
)
_IDENTIFIER = re.compile(r"Identifier\(\s*(?:SCHEMA|['\"]" + SCHEMA + r"['\"])\s*,")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may name tables)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def offending_lines(source: str) -> list[int]:
    """Line numbers of string literals in ``source`` that are SQL against the pgstream schema,
    and of ``sql.Identifier(SCHEMA, ...)`` calls (comments and docstrings do not count)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    lines = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docs
        and _STATEMENT.search(node.value)
    ]
    lines += [n for n, text in enumerate(source.splitlines(), 1) if _IDENTIFIER.search(text)]
    return sorted(set(lines))


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "db")


def test_the_schema_tables_are_known() -> None:
    assert {"partitions", "batches", "dead_letters", "state", "workers", "jobs"} <= set(_TABLES)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_pgstream_schema_sql_outside_db(path: Path) -> None:
    name = str(path.relative_to(PACKAGE))
    found = offending_lines(path.read_text())
    if name in ALLOWED:
        assert found, f"{name} no longer needs its ALLOWED entry: remove it"
        return
    assert not found, (
        f"pgstream/{name} lines {found}: SQL against the {SCHEMA} schema belongs in "
        "pgstream/db/queries.py as a named statement"
    )


def test_every_allowed_module_exists() -> None:
    for name in ALLOWED:
        assert (PACKAGE / name).is_file(), f"ALLOWED names {name}, which does not exist"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('Q = "SELECT x FROM pgstream.batches WHERE job = %s"\n', [1]),
        ('Q = (\n    "SELECT 1 "\n    "FROM pgstream.partitions"\n)\n', [2]),
        ('q = sql.SQL("DELETE FROM {}").format(sql.Identifier(SCHEMA, t))\n', [1]),
        ('q = sql.Identifier("pgstream", "state")\n', [1]),
        ('"""Rows land in pgstream.dead_letters, see FROM pgstream.state."""\n', []),
        ("# DELETE FROM pgstream.jobs\nX = 1\n", []),
        ('msg = "the rest are in pgstream.dead_letters"\n', []),
        ('Q = "SELECT * FROM orders"\n', []),
    ],
)
def test_detector(source: str, expected: list[int]) -> None:
    assert offending_lines(source) == expected

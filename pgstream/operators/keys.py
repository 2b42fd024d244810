"""Key extraction for ``key_by``: field names or a function with a column name."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pgstream.errors import ConfigError
from pgstream.expressions import Expr, column_name


@dataclass(frozen=True, slots=True)
class KeySpec:
    """How to compute a record's key and which sink columns hold it."""

    columns: tuple[str, ...]
    fn: Callable[[Any], Any]  # returns a scalar for one column, a tuple for several
    #: what ``key_by`` was given (field names or the function), for the plan fingerprint
    by: tuple[str, ...] | Callable[[Any], Any] | str | None = None
    #: ``(window size in seconds, time field or function)`` of a windowed key
    window: tuple[float, str | Callable[[Any], Any]] | None = None
    #: the column expressions of ``key_by(expr)`` (None: field names or a function)
    exprs: tuple[Any, ...] | None = None

    @classmethod
    def build(
        cls, key: str | Sequence[str] | Callable[[Any], Any] | Expr, name: str | None = None
    ) -> KeySpec:
        """``key_by("user_id")``, ``key_by(["a", "b"])``, ``key_by(fn, name="col")`` or
        ``key_by(ps.col("a") % 10, name="col")`` (a bare ``ps.col`` names its own column)."""
        if isinstance(key, Expr):
            column = name or column_name(key)
            if not column:
                raise ConfigError(
                    f"key_by({key.describe()}) needs a column name for the key",
                    hint='write key_by(expr, name="my_key")',
                )
            return cls((column,), key.compile(), key.describe(), exprs=(key,))
        if isinstance(key, str):
            return cls((name or key,), operator.itemgetter(key), (key,))
        if callable(key):
            if not name:
                raise ConfigError(
                    "key_by(fn) needs a column name for the key",
                    hint='write key_by(fn, name="my_key")',
                )
            return cls((name,), key, key)
        fields = tuple(key)
        if not fields or not all(isinstance(f, str) for f in fields):
            raise ConfigError("key_by takes a field name, a list of field names or a function")
        if len(fields) == 1:
            return cls(fields, operator.itemgetter(fields[0]), fields)
        return cls(fields, operator.itemgetter(*fields), fields)

    def values(self, key: Any) -> tuple[Any, ...]:
        """The key as a tuple of column values."""
        return key if len(self.columns) > 1 else (key,)

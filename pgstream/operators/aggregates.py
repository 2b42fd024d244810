"""Built-in keyed aggregates. Each batch folds its records into per-key *deltas* that the
upsert sink merges into the table in SQL, so several partitions may update one key safely.

:class:`Aggregate` owns every rule of an aggregate: how a delta starts and grows in Python
(:meth:`~Aggregate.add`, also inlined by the fused kernels through
:meth:`~Aggregate.kernel_code`), how two deltas merge (:meth:`~Aggregate.merge` in Python for
``pgstream verify``, :meth:`~Aggregate.merge_sql` in the sink's upsert) and which columns it
writes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal

from psycopg import sql

from pgstream.errors import ConfigError
from pgstream.expressions import Expr

Kind = Literal["count", "sum", "min", "max", "avg"]
#: what an aggregate reads: a field name, a column expression or a function of the record
Field = str | Expr | Callable[[Any], Any]
_NUMBER = (int, float, Decimal)


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One aggregate column: ``count()``, ``sum("f")``, ``min("f")``, ``max("f")``, ``avg("f")``.

    ``field`` is a record field name or a function of the record; ``name`` (the sink column)
    is set by ``aggregate(name=...)``.
    """

    kind: Kind
    field: Field | None = None
    name: str = ""

    def named(self, name: str) -> Aggregate:
        """This aggregate writing to the sink column ``name``."""
        return replace(self, name=name)

    def extractor(self) -> Callable[[Any], Any] | None:
        """A function reading this aggregate's input from a record (None for ``count()``)."""
        if self.field is None:
            return None
        if isinstance(self.field, str):
            return operator.itemgetter(self.field)
        if isinstance(self.field, Expr):
            return self.field.compile()
        return self.field

    # -- accumulation in Python (one batch) -------------------------------------------------

    def empty(self) -> Any:
        """The accumulator of no input: what :meth:`start` adds a key's first value to."""
        if self.kind == "count":
            return 0
        if self.kind == "avg":
            return (None, 0)
        return None

    def start(self, value: Any) -> Any:
        """The accumulator for a key's first record in a batch."""
        return self.add(self.empty(), value)

    def add(self, acc: Any, value: Any) -> Any:
        """Fold one more input ``value`` into ``acc`` (raises on bad input, mutating nothing)."""
        kind = self.kind
        if kind == "count":
            return acc + (1 if self.field is None or value is not None else 0)
        if value is None:
            return acc
        if kind == "sum":
            if not isinstance(value, _NUMBER):
                raise TypeError(f"sum({self._label()}) needs numbers, got {value!r}")
            return value if acc is None else acc + value
        if kind == "min":
            return value if acc is None or value < acc else acc
        if kind == "max":
            return value if acc is None or value > acc else acc
        if not isinstance(value, _NUMBER):
            raise TypeError(f"avg({self._label()}) needs numbers, got {value!r}")
        total, n = acc
        return (value if total is None else total + value, n + 1)

    def merge(self, a: Any, b: Any) -> Any:
        """Two batches' deltas as one: the Python twin of :meth:`merge_sql`."""
        kind = self.kind
        if kind == "count":
            return a + b
        if kind == "avg":
            (ta, na), (tb, nb) = a, b
            total = tb if ta is None else ta if tb is None else ta + tb
            return (total, na + nb)
        if a is None:
            return b
        if b is None:
            return a
        if kind == "sum":
            return a + b
        if kind == "min":
            return b if b < a else a
        return b if b > a else a

    def kernel_code(self, name: str, x: str, acc: str) -> tuple[str, str]:
        """Python expressions for :meth:`start` and :meth:`add` that the fused aggregate
        kernels inline: ``name`` is this aggregate, ``x`` the input (``None`` for
        ``count()``), ``acc`` the accumulator. ``count()`` and ``sum`` of ints and floats cost
        a few bytecodes; every other case calls :meth:`start` / :meth:`add`."""
        if self.kind == "count" and self.field is None:
            return "1", f"{acc} + 1"
        if self.kind == "sum":
            fast_x = f"(type({x}) is int or type({x}) is float)"
            fast_c = f"(type({acc}) is int or type({acc}) is float)"
            return (
                f"{x} if {fast_x} else {name}.start({x})",
                f"{acc} + {x} if {fast_x} and {fast_c} else {name}.add({acc}, {x})",
            )
        return f"{name}.start({x})", f"{name}.add({acc}, {x})"

    def outputs(self, acc: Any) -> tuple[Any, ...]:
        """The sink column values of a finished accumulator (see :meth:`columns`)."""
        if self.kind == "avg":
            total, n = acc
            return (total / n if n else None, total, n)
        return (acc,)

    # -- the sink side ------------------------------------------------------------------------

    def columns(self) -> tuple[str, ...]:
        """Sink columns this aggregate needs; ``avg`` keeps its running sum and count too."""
        if self.kind == "avg":
            return (self.name, f"_{self.name}_sum", f"_{self.name}_count")
        return (self.name,)

    def merge_sql(self, table: sql.Identifier) -> list[sql.Composable]:
        """``SET`` clauses merging a batch delta (``EXCLUDED``) into the stored row."""
        col = sql.Identifier(self.name)
        if self.kind in ("count", "sum"):
            return [_sum_merge(table, col)]
        if self.kind in ("min", "max"):
            fn = sql.SQL("LEAST" if self.kind == "min" else "GREATEST")
            return [sql.SQL("{c} = {fn}({t}.{c}, EXCLUDED.{c})").format(c=col, fn=fn, t=table)]
        total = sql.Identifier(f"_{self.name}_sum")
        count = sql.Identifier(f"_{self.name}_count")
        new_total = sql.SQL("COALESCE({t}.{s} + EXCLUDED.{s}, {t}.{s}, EXCLUDED.{s})").format(
            t=table, s=total
        )
        new_count = sql.SQL("{t}.{n} + EXCLUDED.{n}").format(t=table, n=count)
        return [
            sql.SQL("{c} = ({tot})::numeric / NULLIF({cnt}, 0)").format(
                c=col, tot=new_total, cnt=new_count
            ),
            sql.SQL("{s} = {tot}").format(s=total, tot=new_total),
            sql.SQL("{n} = {cnt}").format(n=count, cnt=new_count),
        ]

    def _label(self) -> str:
        if isinstance(self.field, Expr):
            return self.field.describe()
        return repr(self.field) if isinstance(self.field, str) else "fn"


def _sum_merge(table: sql.Identifier, col: sql.Identifier) -> sql.Composable:
    return sql.SQL("{c} = COALESCE({t}.{c} + EXCLUDED.{c}, {t}.{c}, EXCLUDED.{c})").format(
        c=col, t=table
    )


def _field(kind: Kind, field: Field | None) -> Aggregate:
    if field is None and kind != "count":
        raise ConfigError(f"{kind}() needs a field name or a function")
    return Aggregate(kind, field)


def count(field: Field | None = None) -> Aggregate:
    """Number of records (or of non-null values of ``field``)."""
    return Aggregate("count", field)


def sum_(field: Field) -> Aggregate:
    """Sum of a numeric field (NULLs ignored). Exported as ``pgstream.sum``."""
    return _field("sum", field)


def min_(field: Field) -> Aggregate:
    """Smallest value of a field. Exported as ``pgstream.min``."""
    return _field("min", field)


def max_(field: Field) -> Aggregate:
    """Largest value of a field. Exported as ``pgstream.max``."""
    return _field("max", field)


def avg(field: Field) -> Aggregate:
    """Mean of a numeric field; the sink also keeps ``_<name>_sum`` and ``_<name>_count``."""
    return _field("avg", field)

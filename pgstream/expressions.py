"""Column expressions: ``ps.col("amount") * 100 > ps.lit(5)``, usable in ``filter``,
``select`` and ``key_by`` (and as an aggregate's input).

An expression is a small tree that has two renderings, and this module owns both and the rules
that make them agree:

* **Python**: :meth:`Expr.compile` generates the source of one function for the whole tree
  (temporaries through ``:=``, no tree walk per record) and compiles it once.
* **SQL**: :meth:`Expr.to_sql` renders it with :mod:`psycopg.sql` (identifiers and literals
  quoted), for the pushed-down path (:mod:`pgstream.runtime.pushdown`).

Semantics (the SQL ones, reproduced in Python):

* ``None`` is SQL ``NULL``: arithmetic, comparisons, ``lower``/``upper`` and ``bucket`` of a
  NULL are NULL; ``&``/``|``/``~`` use three-valued logic (``NULL & False`` is ``False``,
  ``NULL | True`` is ``True``); ``filter`` keeps a record only when its condition is true, so
  a NULL condition drops it; ``coalesce`` returns its first non-NULL argument.
* ``/`` of two integers truncates toward zero (``-7 / 2 == -3``, SQL's rule, not Python's
  ``//``); with a float on either side it is float division. Division by zero raises in both
  (a dead letter in Python, a batch that falls back to Python in SQL), also beside a NULL:
  an operator evaluates both operands before it looks for NULL, as PostgreSQL does.
* ``bucket(seconds=N)`` is ``date_bin``: the start of the N-second bucket aligned to the Unix
  epoch holding a timestamp (naive timestamps are taken as UTC).
* ``lower``/``upper`` map character by character (as PostgreSQL does); a character whose
  mapping would change the string's length (``ß``, ``İ``) is left as it is in Python.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from psycopg import sql

from pgstream.errors import ConfigError

__all__ = [
    "Expr",
    "Select",
    "coalesce",
    "col",
    "lit",
]

#: name -> SQL expression that a column reference resolves to (None: the source's columns)
Env = dict[str, sql.Composable] | None

_LITERAL_TYPES = (bool, int, float, str, Decimal, datetime, date)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _Gen:
    """Python source being generated for one compiled function: temporaries and constants."""

    def __init__(self) -> None:
        self.consts: dict[str, Any] = {}
        self._n = itertools.count()

    def temp(self) -> str:
        return f"_t{next(self._n)}"

    def const(self, value: Any) -> str:
        name = f"_c{len(self.consts)}"
        self.consts[name] = value
        return name


class Expr:
    """A column expression. Build with :func:`col`, :func:`lit` and operators."""

    __slots__ = ()
    #: whether the expression is a condition (a comparison, logic, a NULL test)
    boolean = False

    # -- building ------------------------------------------------------------------------------

    def __add__(self, other: object) -> Expr:
        return _Arith("+", self, _wrap(other))

    def __radd__(self, other: object) -> Expr:
        return _Arith("+", _wrap(other), self)

    def __sub__(self, other: object) -> Expr:
        return _Arith("-", self, _wrap(other))

    def __rsub__(self, other: object) -> Expr:
        return _Arith("-", _wrap(other), self)

    def __mul__(self, other: object) -> Expr:
        return _Arith("*", self, _wrap(other))

    def __rmul__(self, other: object) -> Expr:
        return _Arith("*", _wrap(other), self)

    def __truediv__(self, other: object) -> Expr:
        return _Arith("/", self, _wrap(other))

    def __rtruediv__(self, other: object) -> Expr:
        return _Arith("/", _wrap(other), self)

    def __neg__(self) -> Expr:
        return _Arith("-", _Lit(0), self)

    def __eq__(self, other: object) -> Expr:  # type: ignore[override]
        return _Compare("==", self, _not_none(other, "is_null"))

    def __ne__(self, other: object) -> Expr:  # type: ignore[override]
        return _Compare("!=", self, _not_none(other, "is_not_null"))

    def __lt__(self, other: object) -> Expr:
        return _Compare("<", self, _wrap(other))

    def __le__(self, other: object) -> Expr:
        return _Compare("<=", self, _wrap(other))

    def __gt__(self, other: object) -> Expr:
        return _Compare(">", self, _wrap(other))

    def __ge__(self, other: object) -> Expr:
        return _Compare(">=", self, _wrap(other))

    def __and__(self, other: object) -> Expr:
        return _Logic("and", self, _wrap(other))

    def __rand__(self, other: object) -> Expr:
        return _Logic("and", _wrap(other), self)

    def __or__(self, other: object) -> Expr:
        return _Logic("or", self, _wrap(other))

    def __ror__(self, other: object) -> Expr:
        return _Logic("or", _wrap(other), self)

    def __invert__(self) -> Expr:
        return _Not(self)

    def __bool__(self) -> bool:
        raise ConfigError(
            "a column expression has no truth value in Python (and/or/not or a chained "
            "comparison was used)",
            hint="combine conditions with & | ~ and parentheses: (ps.col('a') > 0) & "
            "(ps.col('b') < 5)",
        )

    __hash__ = object.__hash__

    def is_null(self) -> Expr:
        """True where the value is NULL (``None``)."""
        return _NullTest(self, True)

    def is_not_null(self) -> Expr:
        """True where the value is not NULL."""
        return _NullTest(self, False)

    def is_in(self, values: Sequence[Any]) -> Expr:
        """True where the value is one of ``values`` (NULL where the value is NULL)."""
        items = tuple(values)
        if not items or any(v is None or not isinstance(v, _LITERAL_TYPES) for v in items):
            raise ConfigError(
                "is_in() takes a non-empty list of literal values without None",
                hint="test for NULL with .is_null()",
            )
        return _In(self, items)

    def lower(self) -> Expr:
        """The text in lower case."""
        return _Case(self, "lower")

    def upper(self) -> Expr:
        """The text in upper case."""
        return _Case(self, "upper")

    def bucket(self, *, seconds: float = 0, minutes: float = 0, hours: float = 0) -> Expr:
        """The start of the epoch-aligned bucket holding a timestamp (SQL ``date_bin``)."""
        size = timedelta(seconds=seconds, minutes=minutes, hours=hours)
        if size <= timedelta(0):
            raise ConfigError("bucket() needs a positive size, e.g. bucket(seconds=60)")
        return _Bucket(self, size)

    # -- rendering -----------------------------------------------------------------------------

    def py(self, gen: _Gen) -> str:
        """Python source evaluating this expression over the record ``r``."""
        raise NotImplementedError

    def to_sql(self, env: Env) -> sql.Composable:
        """SQL text of this expression; column names resolve through ``env``."""
        raise NotImplementedError

    def describe(self) -> str:
        """A canonical text of the expression (for plans and messages)."""
        raise NotImplementedError

    def columns(self) -> set[str]:
        """The record fields this expression reads."""
        raise NotImplementedError

    def compile(self) -> Callable[[Any], Any]:
        """One Python function computing this expression from a record (a dict)."""
        gen = _Gen()
        return _build(f"return {self.py(gen)}", gen, self.describe())

    def compile_predicate(self) -> Callable[[Any], bool]:
        """One Python function: whether a record passes this condition (only ``True`` does)."""
        gen = _Gen()
        return _build(f"return ({self.py(gen)}) is True", gen, self.describe())

    def __repr__(self) -> str:
        return self.describe()


def _build(body: str, gen: _Gen, label: str) -> Callable[[Any], Any]:
    source = f"def _expr(r):\n    {body}\n"
    namespace: dict[str, Any] = {**gen.consts, **_HELPERS}
    exec(compile(source, f"<expression {label[:60]}>", "exec"), namespace)
    fn: Callable[[Any], Any] = namespace["_expr"]
    return fn


def _sql_literal(value: Any) -> sql.Composable:
    """``value`` quoted as SQL text: integers as ``bigint`` (Python's ints are not ``int4``),
    ``%`` doubled (the statement also carries parameters)."""
    text = sql.Literal(value).as_string(None).replace("%", "%%")
    if isinstance(value, int) and not isinstance(value, bool):
        text += "::bigint"
    return sql.SQL(text)


def _not_none(value: object, instead: str) -> Expr:
    if value is None:
        raise ConfigError(
            "comparing with None is always NULL (as in SQL), so it never matches",
            hint=f"use .{instead}()",
        )
    return _wrap(value)


def _wrap(value: object) -> Expr:
    if isinstance(value, Expr):
        return value
    return lit(value)


class _Col(Expr):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def py(self, gen: _Gen) -> str:
        return f"r[{self.name!r}]"

    def to_sql(self, env: Env) -> sql.Composable:
        if env is None:
            return sql.Identifier(self.name)
        if self.name not in env:
            raise UnknownColumn(self.name)
        return env[self.name]

    def describe(self) -> str:
        return f"col({self.name!r})"

    def columns(self) -> set[str]:
        return {self.name}


class UnknownColumn(Exception):
    """A column reference that the ``select`` before it does not produce."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Lit(Expr):
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    @property
    def boolean(self) -> bool:  # type: ignore[override]
        return isinstance(self.value, bool)

    def py(self, gen: _Gen) -> str:
        if self.value is None or isinstance(self.value, (bool, int, str)):
            return repr(self.value)
        return gen.const(self.value)

    def to_sql(self, env: Env) -> sql.Composable:
        return _sql_literal(self.value)

    def describe(self) -> str:
        return f"lit({self.value!r})"

    def columns(self) -> set[str]:
        return set()


class _Binary(Expr):
    __slots__ = ("a", "b", "op")

    def __init__(self, op: str, a: Expr, b: Expr) -> None:
        self.op, self.a, self.b = op, a, b

    def describe(self) -> str:
        return f"({self.a.describe()} {self.op} {self.b.describe()})"

    def columns(self) -> set[str]:
        return self.a.columns() | self.b.columns()


def _strict(a: str, pa: str, b: str, pb: str) -> str:
    """The NULL test of a strict SQL operator: BOTH operands are evaluated (``|``, not
    ``or``), as PostgreSQL evaluates an operator's arguments before it looks for a NULL, so
    ``NULL > 1 / 0`` raises in Python as it does in SQL."""
    return f"((({a} := {pa}) is None) | (({b} := {pb}) is None))"


class _Arith(_Binary):
    __slots__ = ()

    def py(self, gen: _Gen) -> str:
        a, b = gen.temp(), gen.temp()
        pa, pb = self.a.py(gen), self.b.py(gen)
        op = "_div(" + a + ", " + b + ")" if self.op == "/" else f"{a} {self.op} {b}"
        return f"(None if {_strict(a, pa, b, pb)} else {op})"

    def to_sql(self, env: Env) -> sql.Composable:
        return sql.SQL("({} " + self.op + " {})").format(self.a.to_sql(env), self.b.to_sql(env))


_SQL_COMPARE = {"==": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


class _Compare(_Binary):
    __slots__ = ()
    boolean = True

    def py(self, gen: _Gen) -> str:
        a, b = gen.temp(), gen.temp()
        pa, pb = self.a.py(gen), self.b.py(gen)
        return f"(None if {_strict(a, pa, b, pb)} else {a} {self.op} {b})"

    def to_sql(self, env: Env) -> sql.Composable:
        op = _SQL_COMPARE[self.op]
        return sql.SQL("({} " + op + " {})").format(self.a.to_sql(env), self.b.to_sql(env))


class _Logic(_Binary):
    __slots__ = ()
    boolean = True

    def py(self, gen: _Gen) -> str:
        a, b = gen.temp(), gen.temp()
        pa, pb = self.a.py(gen), self.b.py(gen)
        if self.op == "and":
            return (
                f"(False if ({a} := {pa}) is False or ({b} := {pb}) is False "
                f"else None if {a} is None or {b} is None else True)"
            )
        return (
            f"(True if ({a} := {pa}) is True or ({b} := {pb}) is True "
            f"else None if {a} is None or {b} is None else False)"
        )

    def to_sql(self, env: Env) -> sql.Composable:
        op = "AND" if self.op == "and" else "OR"
        return sql.SQL("({} " + op + " {})").format(self.a.to_sql(env), self.b.to_sql(env))

    def describe(self) -> str:
        sym = "&" if self.op == "and" else "|"
        return f"({self.a.describe()} {sym} {self.b.describe()})"


class _Unary(Expr):
    __slots__ = ("a",)

    def __init__(self, a: Expr) -> None:
        self.a = a

    def columns(self) -> set[str]:
        return self.a.columns()


class _Not(_Unary):
    __slots__ = ()
    boolean = True

    def py(self, gen: _Gen) -> str:
        a = gen.temp()
        return f"(None if ({a} := {self.a.py(gen)}) is None else not {a})"

    def to_sql(self, env: Env) -> sql.Composable:
        return sql.SQL("(NOT {})").format(self.a.to_sql(env))

    def describe(self) -> str:
        return f"~{self.a.describe()}"


class _NullTest(_Unary):
    __slots__ = ("null",)
    boolean = True

    def __init__(self, a: Expr, null: bool) -> None:
        super().__init__(a)
        self.null = null

    def py(self, gen: _Gen) -> str:
        return f"(({self.a.py(gen)}) is {'' if self.null else 'not '}None)"

    def to_sql(self, env: Env) -> sql.Composable:
        test = "IS NULL" if self.null else "IS NOT NULL"
        return sql.SQL("({} " + test + ")").format(self.a.to_sql(env))

    def describe(self) -> str:
        return f"{self.a.describe()}.{'is_null' if self.null else 'is_not_null'}()"


class _In(_Unary):
    __slots__ = ("values",)
    boolean = True

    def __init__(self, a: Expr, values: tuple[Any, ...]) -> None:
        super().__init__(a)
        self.values = values

    def py(self, gen: _Gen) -> str:
        a = gen.temp()
        consts = gen.const(frozenset(self.values))
        return f"(None if ({a} := {self.a.py(gen)}) is None else {a} in {consts})"

    def to_sql(self, env: Env) -> sql.Composable:
        items = sql.SQL(", ").join(_sql_literal(v) for v in self.values)
        return sql.SQL("({} IN ({}))").format(self.a.to_sql(env), items)

    def describe(self) -> str:
        return f"{self.a.describe()}.is_in({list(self.values)!r})"


class _Case(_Unary):
    __slots__ = ("fn",)

    def __init__(self, a: Expr, fn: str) -> None:
        super().__init__(a)
        self.fn = fn

    def py(self, gen: _Gen) -> str:
        a = gen.temp()
        return f"(None if ({a} := {self.a.py(gen)}) is None else _{self.fn}({a}))"

    def to_sql(self, env: Env) -> sql.Composable:
        return sql.SQL(self.fn + "({})").format(self.a.to_sql(env))

    def describe(self) -> str:
        return f"{self.a.describe()}.{self.fn}()"


class _Bucket(_Unary):
    __slots__ = ("size",)

    def __init__(self, a: Expr, size: timedelta) -> None:
        super().__init__(a)
        self.size = size

    def py(self, gen: _Gen) -> str:
        a = gen.temp()
        size = gen.const(self.size)
        return f"(None if ({a} := {self.a.py(gen)}) is None else _bucket({a}, {size}))"

    def to_sql(self, env: Env) -> sql.Composable:
        secs = sql.Literal(self.size.total_seconds())
        return sql.SQL("date_bin(make_interval(secs => {}), {}, {})").format(
            secs, self.a.to_sql(env), sql.SQL("'1970-01-01 00:00:00+00'::timestamptz")
        )

    def describe(self) -> str:
        return f"{self.a.describe()}.bucket(seconds={self.size.total_seconds():g})"


class _Coalesce(Expr):
    __slots__ = ("args",)

    def __init__(self, args: tuple[Expr, ...]) -> None:
        self.args = args

    def py(self, gen: _Gen) -> str:
        parts = []
        for arg in self.args:
            t = gen.temp()
            parts.append(f"{t} if ({t} := {arg.py(gen)}) is not None else")
        return "(" + " ".join(parts) + " None)"

    def to_sql(self, env: Env) -> sql.Composable:
        return sql.SQL("COALESCE({})").format(sql.SQL(", ").join(a.to_sql(env) for a in self.args))

    def describe(self) -> str:
        return "coalesce(" + ", ".join(a.describe() for a in self.args) + ")"

    def columns(self) -> set[str]:
        return set().union(*(a.columns() for a in self.args))


# -- the helpers compiled functions call -------------------------------------------------------


def _div(a: Any, b: Any) -> Any:
    """SQL division: two integers truncate toward zero; anything else divides exactly."""
    if not b:
        raise ZeroDivisionError("division by zero")
    if type(a) is int and type(b) is int:
        q = abs(a) // abs(b)
        return q if (a < 0) == (b < 0) else -q
    return a / b


def _case_map(s: str, upper: bool) -> str:
    if s.isascii():
        return s.upper() if upper else s.lower()
    out = []
    for ch in s:
        m = ch.upper() if upper else ch.lower()
        out.append(m if len(m) == 1 else ch)
    return "".join(out)


def _lower(s: str) -> str:
    return _case_map(s, False)


def _upper(s: str) -> str:
    return _case_map(s, True)


def _bucket(ts: datetime, size: timedelta) -> datetime:
    naive = ts.tzinfo is None
    aware = ts.replace(tzinfo=timezone.utc) if naive else ts
    start = _EPOCH + (aware - _EPOCH) // size * size
    return start.replace(tzinfo=None) if naive else start


_HELPERS: dict[str, Any] = {"_div": _div, "_lower": _lower, "_upper": _upper, "_bucket": _bucket}


# -- select ------------------------------------------------------------------------------------


class Select:
    """``select(name=expr, ...)``: a record becomes a dict of the named expressions."""

    __slots__ = ("items",)

    def __init__(self, items: tuple[tuple[str, Expr], ...]) -> None:
        self.items = items

    def compile(self) -> Callable[[Any], dict[str, Any]]:
        """One Python function building the output dict."""
        gen = _Gen()
        fields = ", ".join(f"{name!r}: {expr.py(gen)}" for name, expr in self.items)
        return _build("return {" + fields + "}", gen, self.describe())

    def env(self, outer: Env) -> dict[str, sql.Composable]:
        """Each output column as SQL over ``outer`` (what later steps' columns resolve to)."""
        return {name: expr.to_sql(outer) for name, expr in self.items}

    def describe(self) -> str:
        return "select(" + ", ".join(f"{n}={e.describe()}" for n, e in self.items) + ")"


# -- the public constructors -------------------------------------------------------------------


def col(name: str) -> Expr:
    """The record field (table column) ``name``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"col() takes a column name, got {name!r}")
    return _Col(name)


def lit(value: Any) -> Expr:
    """A constant: None, bool, int, float, str, Decimal, date or datetime."""
    if isinstance(value, Expr):
        return value
    if value is not None and not isinstance(value, _LITERAL_TYPES):
        raise ConfigError(
            f"lit() takes None, bool, int, float, str, Decimal, date or datetime, got "
            f"{type(value).__name__} {value!r}"
        )
    return _Lit(value)


def coalesce(*args: Any) -> Expr:
    """The first argument that is not NULL (``None``)."""
    if len(args) < 2:
        raise ConfigError("coalesce() needs at least two arguments")
    return _Coalesce(tuple(_wrap(a) for a in args))


def column_name(expr: Expr) -> str | None:
    """The column a bare ``col(...)`` names (None for anything else)."""
    return expr.name if isinstance(expr, _Col) else None

"""``fold(initial, fn)``: arbitrary per-key Python state, stored as JSON.

The state handed to ``fn`` must equal the state ``fn`` returned, so a state is only accepted
when it survives a JSON round trip unchanged: dicts with ``str`` keys, lists, ``str``, ``int``,
finite ``float``, ``bool`` and ``None`` (exact types, not subclasses). Anything else (a
datetime, Decimal, tuple, set, bytes, NaN, an int key, a custom object...) would come back as
another type or value, so the record fails with :class:`FoldStateError` naming the value and
where it is: a dead letter, or the worker stops with ``on_error="fail"``.

The check runs per record, so it is cheap: the serialisation that stores the state refuses
whatever orjson would otherwise convert (datetimes, subclasses, dataclasses, unknown types); a
flat dict of scalars is then checked inline, anything else by decoding the bytes again and
comparing. The walk that names the offending value runs only when a state is refused.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from pgstream.errors import ConfigError

#: serialise only what decodes to the same value: no datetime/subclass/dataclass conversions
_STRICT = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_SCALARS = frozenset({str, int, bool, type(None)})


class FoldStateError(TypeError):
    """A fold state (or initial value) that would not come back unchanged from JSON."""


@dataclass(frozen=True, slots=True)
class Fold:
    """Per-key state ``fn(state, record) -> state`` starting from ``initial``.

    ``initial`` is a plain JSON value (decoded afresh for each new key) or a zero-argument
    factory returning one; a value that is not plain JSON is a :class:`ConfigError` here. The
    result is written to the sink once per touched key per batch: a dict state gives one column
    per field, any other value a column named ``value``.
    """

    initial: Any
    fn: Callable[[Any, Any], Any]
    _initial_blob: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if callable(self.initial):
            return
        try:
            blob, _ = _round_trip(self.initial)
        except _NotPlain as exc:
            raise ConfigError(
                f"fold initial value is not plain JSON: {exc.describe('initial')}",
                hint="the state a fold receives must equal the one it returned, and states are "
                "stored as JSON; " + exc.advice,
            ) from None
        object.__setattr__(self, "_initial_blob", blob)

    def new_state(self) -> Any:
        """A fresh initial state for an unseen key."""
        if self._initial_blob is not None:
            return orjson.loads(self._initial_blob)
        return self.initial()

    def step(self, blob: bytes | None, record: Any, key: Any = None) -> bytes:
        """Apply one record to the serialised state ``blob``; return the new serialised state.

        Working on a private copy makes a raising ``fn`` leave the stored state untouched.
        Raises :class:`FoldStateError` when the new state (or a factory's initial state) would
        not survive the JSON round trip; ``key`` only names the key in that message.
        """
        if blob is not None:
            state = orjson.loads(blob)
        else:
            state = self.new_state()
            if self._initial_blob is None:
                try:
                    _round_trip(state)
                except _NotPlain as exc:
                    raise exc.fold_error("returned by initial()", key) from None
        new = self.fn(state, record)
        t = type(new)
        if t is dict:  # the common flat state, checked inline
            for k, v in new.items():
                tv = type(v)
                if type(k) is not str or (tv not in _SCALARS and (tv is not float or v - v != 0.0)):
                    return self._checked(new, "returned by the fold", key)
            try:  # exact scalar types only: nothing for orjson to convert
                return orjson.dumps(new)
            except orjson.JSONEncodeError:  # an int beyond 64 bits, a lone surrogate
                return self._checked(new, "returned by the fold", key)
        if t in _SCALARS:
            try:
                return orjson.dumps(new)
            except orjson.JSONEncodeError:  # an int beyond 64 bits, a lone surrogate
                pass
        return self._checked(new, "returned by the fold", key)

    def _checked(self, state: Any, origin: str, key: Any) -> bytes:
        """The serialised ``state`` after the full round-trip check, or
        :class:`FoldStateError` naming what is not plain JSON."""
        try:
            return _round_trip(state)[0]
        except _NotPlain as exc:
            raise exc.fold_error(origin, key) from None

    @staticmethod
    def output(state_blob: bytes) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """The sink columns and values for a final state."""
        state = orjson.loads(state_blob)
        if isinstance(state, dict):
            return tuple(state), tuple(_jsonable(v) for v in state.values())
        return ("value",), (_jsonable(state),)


class _NotPlain(Exception):
    """``value`` would not survive the JSON round trip; says where and why."""

    def __init__(self, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason

    def describe(self, root: str) -> str:
        """``state['x'] is a datetime``, or the serialiser's reason if no part is to blame."""
        found = _first_problem(self.value, root)
        return self.reason if found is None else found[1]

    @property
    def advice(self) -> str:
        """How to store the offending value instead."""
        return _advice(self.value, "state")

    def fold_error(self, origin: str, key: Any) -> FoldStateError:
        """The record's error: what is not plain JSON, where, on which key, and the fix."""
        return FoldStateError(
            f"fold state is not plain JSON: {self.describe('state')} ({origin} on key "
            f"{key!r}); {self.advice}"
        )


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not plain JSON")


def _round_trip(value: Any) -> tuple[bytes, Any]:
    """``value`` serialised and decoded again, or :class:`_NotPlain` when decoding would not
    give it back."""
    try:
        blob = orjson.dumps(value, default=_refuse, option=_STRICT)
    except orjson.JSONEncodeError as exc:
        raise _NotPlain(value, str(exc)) from None
    decoded = orjson.loads(blob)
    if decoded != value:
        raise _NotPlain(value, "it decodes from JSON to a different value")
    return blob, decoded


def not_plain_json(value: Any, path: str) -> str | None:
    """Where ``value`` stops being plain JSON and what is there (``"state['x'] is a
    datetime"``), or ``None`` when every part of it has a plain JSON type."""
    found = _first_problem(value, path)
    return None if found is None else found[1]


def _first_problem(value: Any, path: str) -> tuple[Any, str] | None:
    """``(offending value, description)`` of the first non-plain part, depth first."""
    t = type(value)
    if t in _SCALARS:
        return None
    if t is float:
        if value - value == 0.0:
            return None
        return value, f"{path} is {value!r}, which JSON cannot hold"
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                kind = type(k).__name__
                return k, f"{path} has the key {k!r} of type {kind}, but JSON keys are strings"
            found = _first_problem(v, f"{path}[{k!r}]")
            if found is not None:
                return found
        return None
    if t is list:
        for i, v in enumerate(value):
            found = _first_problem(v, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return value, f"{path} is {_kind(value)}"


def _kind(value: Any) -> str:
    """``a datetime``, ``a Decimal``, ``an E (an int subclass)``..."""
    t = type(value)
    for base in (dict, list, str, int, float):
        if isinstance(value, base) and t is not base:
            return f"{_a(t.__name__)} (a subclass of {base.__name__})"
    return _a(t.__name__)


def _a(name: str) -> str:
    return f"an {name}" if name[:1] in "aeioAEIO" else f"a {name}"


def _advice(state: Any, path: str) -> str:
    """How to store the offending value instead."""
    found = _first_problem(state, path)
    if found is None:
        return _PLAIN_TYPES
    bad, problem = found
    if problem.endswith("JSON keys are strings"):
        return "use str keys instead, e.g. str(key)"
    if isinstance(bad, (datetime.datetime, datetime.date, datetime.time)):
        return "store a str instead, e.g. ts.isoformat()"
    if isinstance(bad, decimal.Decimal):
        return "store an int (e.g. cents) or a str instead, e.g. str(amount)"
    if isinstance(bad, tuple):
        return "store a list instead"
    if isinstance(bad, (set, frozenset)):
        return "store a sorted list instead"
    if isinstance(bad, (bytes, bytearray, memoryview)):
        return "store a str instead, e.g. data.hex()"
    if isinstance(bad, float):
        return "store None or a str instead"
    if isinstance(bad, enum.Enum):
        return "store its .value or .name instead"
    if isinstance(bad, uuid.UUID):
        return "store str(value) instead"
    if isinstance(bad, (dict, list, str, int)):
        return "convert it to the plain type, e.g. dict(value) or int(value)"
    return _PLAIN_TYPES


_PLAIN_TYPES = "store only dicts with str keys, lists, str, int, float, bool and None"


def _jsonable(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value) if isinstance(value, (dict, list)) else value

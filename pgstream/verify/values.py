"""Comparing an operator's output with what a table stores: tolerant of the database's types
(numbers summed in another order, ISO strings for timestamps, JSON), and keys normalized so
that 5, 5.0 and Decimal(5) name the same row."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal
from typing import Any

import orjson

#: tolerances for numbers that went through floats in another order
REL_TOL = 1e-6
ABS_TOL = 1e-6


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, Decimal)) and not isinstance(v, bool)


#: a decimal with at least this many fractional digits is a quotient (an average), rounded
#: where the one who divided stopped: PostgreSQL's numeric division keeps 16 or more digits,
#: Python's Decimal 28 significant digits
QUOTIENT_DIGITS = 15


def _numbers_close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, Decimal)) and isinstance(b, (int, Decimal)):
        return bool(a == b) or _quotients_equal(Decimal(a), Decimal(b))
    fa, fb = float(a), float(b)
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    return math.isclose(fa, fb, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _quotients_equal(a: Decimal, b: Decimal) -> bool:
    """Two results of one division rounded to different lengths: equal to within one unit in
    the last place of the shorter. Exact numbers (sums, counts: fewer fractional digits) must
    match exactly."""
    if not (a.is_finite() and b.is_finite()):
        return False
    digits = min(-int(a.as_tuple().exponent), -int(b.as_tuple().exponent))
    if digits < QUOTIENT_DIGITS:
        return False
    return abs(a - b) <= Decimal(1).scaleb(-digits)


def _parse_time(text: str) -> dt.datetime | dt.date | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            return None


def values_equal(expected: Any, actual: Any) -> bool:
    """Does the stored ``actual`` hold the operator output ``expected``?

    Numbers compare with a tolerance (floats summed in another order), ISO strings match
    timestamps, JSON compares structurally.
    """
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, bool) or isinstance(actual, bool):
        return bool(expected == actual)
    if _is_number(expected) and _is_number(actual):
        return _numbers_close(expected, actual)
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            values_equal(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(
            values_equal(e, a) for e, a in zip(expected, actual)
        )
    if isinstance(expected, str) and isinstance(actual, (dt.date, dt.datetime)):
        parsed = _parse_time(expected)
        return parsed is not None and _times_equal(parsed, actual)
    if isinstance(expected, (dt.date, dt.datetime)) and isinstance(actual, (dt.date, dt.datetime)):
        return _times_equal(expected, actual)
    if isinstance(expected, str) and isinstance(actual, (uuid.UUID, Decimal)):
        return expected == str(actual)
    if isinstance(expected, uuid.UUID) and isinstance(actual, str):
        return str(expected) == actual
    if isinstance(expected, bytes) and isinstance(actual, (bytes, memoryview)):
        return expected == bytes(actual)
    return bool(expected == actual)


def _times_equal(a: dt.date | dt.datetime, b: dt.date | dt.datetime) -> bool:
    if isinstance(a, dt.datetime) and isinstance(b, dt.datetime):
        if (a.tzinfo is None) != (b.tzinfo is None):
            a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
        return a == b
    return a == b


def _norm_key_part(v: Any) -> Any:
    """A hashable, type-tolerant form of one key column value (5, 5.0 and Decimal(5) agree)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, Decimal)):
        return int(v) if v == int(v) else float(v)
    if isinstance(v, float):
        return int(v) if v.is_integer() else v
    if isinstance(v, dt.datetime):
        return (v.astimezone(dt.timezone.utc) if v.tzinfo else v).isoformat()
    if isinstance(v, (dt.date, uuid.UUID)):
        return str(v)
    if isinstance(v, (dict, list)):
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    if isinstance(v, memoryview):
        return bytes(v)
    return v


def norm_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_norm_key_part(v) for v in values)


def show(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

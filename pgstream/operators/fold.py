"""``fold(initial, fn)``: arbitrary per-key Python state, JSON-serialisable."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Fold:
    """Per-key state ``fn(state, record) -> state`` starting from ``initial``.

    ``initial`` is a JSON value (copied for each new key) or a zero-argument factory.
    The result is written to the sink once per touched key per batch: a dict state gives
    one column per field, any other value a column named ``value``.
    """

    initial: Any
    fn: Callable[[Any, Any], Any]

    def new_state(self) -> Any:
        """A fresh initial state for an unseen key."""
        if callable(self.initial):
            return self.initial()
        return copy.deepcopy(self.initial)

    def step(self, blob: bytes | None, record: Any) -> bytes:
        """Apply one record to the serialised state ``blob``; return the new serialised state.

        Working on a private copy makes a raising ``fn`` leave the stored state untouched.
        """
        state = self.new_state() if blob is None else orjson.loads(blob)
        return orjson.dumps(self.fn(state, record))

    @staticmethod
    def output(state_blob: bytes) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """The sink columns and values for a final state."""
        state = orjson.loads(state_blob)
        if isinstance(state, dict):
            return tuple(state), tuple(_jsonable(v) for v in state.values())
        return ("value",), (_jsonable(state),)


def _jsonable(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value) if isinstance(value, (dict, list)) else value

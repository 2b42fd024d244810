"""Stateless record operators and their compilation into one function per sink path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Record = Any


@dataclass(frozen=True, slots=True)
class Filter:
    """Keep records for which ``fn`` is true."""

    fn: Callable[[Record], object]


@dataclass(frozen=True, slots=True)
class Map:
    """Replace each record by ``fn(record)``."""

    fn: Callable[[Record], Record]


@dataclass(frozen=True, slots=True)
class FlatMap:
    """Replace each record by the zero or more records ``fn(record)`` yields."""

    fn: Callable[[Record], Iterable[Record]]


Step = Filter | Map | FlatMap


def compile_chain(steps: Sequence[Step]) -> Callable[[Record], list[Record]]:
    """Compile ``steps`` into one function returning the outputs of one input record.

    Chains without ``flat_map`` are composed into nested closures that do no list work
    per step; the general case threads a list through the steps.
    """
    if not any(isinstance(s, FlatMap) for s in steps):
        single = _compile_single(steps)
        skip = _SKIP

        def run_single(record: Record) -> list[Record]:
            out = single(record)
            return [] if out is skip else [out]

        return run_single

    def run_many(record: Record) -> list[Record]:
        items = [record]
        for step in steps:
            if isinstance(step, Filter):
                fn = step.fn
                items = [x for x in items if fn(x)]
            elif isinstance(step, Map):
                mf = step.fn
                items = [mf(x) for x in items]
            else:
                ff = step.fn
                items = [y for x in items for y in ff(x)]
            if not items:
                break
        return items

    return run_many


class _Skip:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIP"


_SKIP: Any = _Skip()


def _compile_single(steps: Sequence[Step]) -> Callable[[Record], Record]:
    """Compose map/filter steps into one function returning a value or the skip marker."""
    fn: Callable[[Record], Record] = _identity
    for step in steps:
        fn = _then(fn, step)
    return fn


def _identity(record: Record) -> Record:
    return record


def _then(prev: Callable[[Record], Record], step: Step) -> Callable[[Record], Record]:
    skip = _SKIP
    if isinstance(step, Filter):
        pred = step.fn
        if prev is _identity:
            return lambda r: r if pred(r) else skip

        def filtered(r: Record) -> Record:
            v = prev(r)
            if v is skip or not pred(v):
                return skip
            return v

        return filtered
    assert isinstance(step, Map)
    mf = step.fn
    if prev is _identity:
        return mf

    def mapped(r: Record) -> Record:
        v = prev(r)
        return skip if v is skip else mf(v)

    return mapped

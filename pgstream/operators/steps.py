"""Stateless record operators and their composition into one function per sink path.

This module owns step composition: :func:`compose` (map/filter into one function returning
an output or :data:`SKIP`) is what both the general evaluation loop (:func:`compile_chain`)
and the fused kernels (:mod:`pgstream.runtime.kernels`) run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pgstream.operators.lookup import Lookup

Record = Any


@dataclass(frozen=True, slots=True)
class Filter:
    """Keep records for which ``fn`` is true."""

    fn: Callable[[Record], object]
    #: the column expression ``fn`` was compiled from (None: a Python callable)
    expr: Any = None


@dataclass(frozen=True, slots=True)
class Map:
    """Replace each record by ``fn(record)``."""

    fn: Callable[[Record], Record]
    #: the ``select`` ``fn`` was compiled from (None: a Python callable)
    expr: Any = None


@dataclass(frozen=True, slots=True)
class FlatMap:
    """Replace each record by the zero or more records ``fn(record)`` yields."""

    fn: Callable[[Record], Iterable[Record]]


#: a :class:`~pgstream.operators.lookup.Lookup` is replaced by ordinary steps when a pipeline
#: binds it (:meth:`~pgstream.operators.lookup.BoundLookup.steps`) before anything compiles it
Step = Filter | Map | FlatMap | Lookup


class _Skip:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIP"


#: what a composed step function returns for a record a filter dropped
SKIP: Any = _Skip()


def identity(record: Record) -> Record:
    """The composition of no steps."""
    return record


def compose(steps: Sequence[Step]) -> Callable[[Record], Record] | None:
    """``steps`` as one function returning the output or :data:`SKIP` (filtered out);
    ``None`` when a ``flat_map`` makes the number of outputs vary.

    The steps nest as closures that do no list work per record; no steps give
    :func:`identity` (which the kernels recognise and leave out).
    """
    fn: Callable[[Record], Record] = identity
    for step in steps:
        if isinstance(step, FlatMap):
            return None
        if isinstance(step, Lookup):
            raise _unbound(step)
        fn = _then(fn, step)
    return fn


def compile_chain(steps: Sequence[Step]) -> Callable[[Record], list[Record]]:
    """Compile ``steps`` into one function returning the outputs of one input record.

    Chains without ``flat_map`` run :func:`compose`'s function; the general case threads a
    list through the steps.
    """
    single = compose(steps)
    if single is not None:
        skip = SKIP
        run = single

        def run_single(record: Record) -> list[Record]:
            out = run(record)
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
            elif isinstance(step, Lookup):
                raise _unbound(step)
            else:
                ff = step.fn
                items = [y for x in items for y in ff(x)]
            if not items:
                break
        return items

    return run_many


def _unbound(step: Lookup) -> TypeError:
    return TypeError(f"lookup({step.table!r}) was not bound by the pipeline before compiling")


def _then(prev: Callable[[Record], Record], step: Filter | Map) -> Callable[[Record], Record]:
    skip = SKIP
    if isinstance(step, Filter):
        pred = step.fn
        if prev is identity:
            return lambda r: r if pred(r) else skip

        def filtered(r: Record) -> Record:
            v = prev(r)
            if v is skip or not pred(v):
                return skip
            return v

        return filtered
    mf = step.fn
    if prev is identity:
        return mf

    def mapped(r: Record) -> Record:
        v = prev(r)
        return skip if v is skip else mf(v)

    return mapped

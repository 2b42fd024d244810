"""Fused evaluation loops for the common case: one source feeding one append or aggregate sink.

:meth:`Pipeline.evaluate <pgstream.runtime.pipeline.Pipeline.evaluate>` stages every record
against every plan, then applies it; that costs several calls and allocations per record. When a
partition feeds exactly one append or aggregate plan through ``map``/``filter`` steps, a kernel
does the same work in one loop per batch: decode the line (for JSON Lines input), run the
composed steps, and add the result to the batch's output.

The semantics are the general loop's: a record that fails (undecodable, an operator raising, a
non-dict output, a bad aggregate input) is handed to ``fail`` *before* it changed anything, and
the caller turns it into a dead letter (or stops). Edge cases the fast path does not handle
itself (a decode error, a value of an unusual type for ``sum``) go to the same code the general
loop uses, so both paths produce identical outputs. ``fail`` gets the exception itself, with its
traceback, so the dead letter can name the user's file and line.
"""

from __future__ import annotations

import gc
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson

from pgstream.operators.aggregates import Aggregate
from pgstream.operators.steps import Filter, Map, Step
from pgstream.sources.base import SourceRecord
from pgstream.sources.file import JsonLines

Row = tuple[Any, ...]
Groups = dict[tuple[str, ...], list[Row]]
Accumulators = dict[Any, list[Any]]

#: ``fail(line, value, exc)`` for JSON Lines input: ``value`` is the decoded record (``None``
#: and ``exc`` ``None`` when the line did not decode to an object). Failures come in line order
#: and ``line`` is the very object of ``batch.lines``, which is how the caller finds its offset.
LineFail = Callable[[bytes, Any, "BaseException | None"], None]
#: ``fail(record, exc)`` for decoded records (``exc`` ``None`` when the record has no value).
RecordFail = Callable[[SourceRecord, "BaseException | None"], None]

#: the file name of generated kernel code in tracebacks
KERNEL_FILENAME = "<pgstream aggregate kernel>"

#: ``kernel(batch, target, fail)``: ``target`` is the plan's groups (append) or accumulators
LinesKernel = Callable[[JsonLines, Any, LineFail], None]
RecordsKernel = Callable[[Sequence[SourceRecord], Any, RecordFail], None]


class _Skip:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIP"


SKIP: Any = _Skip()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector around a kernel loop.

    A chunk allocates tens of thousands of dicts and tuples and keeps many of them (rows,
    accumulators); the collections they trigger cost 5-8% of the loop and find nothing, since
    decoded JSON holds no reference cycles. Collection resumes after the chunk.
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compose(steps: Sequence[Step]) -> Callable[[Any], Any] | None:
    """``steps`` as one function returning the output or :data:`SKIP` (filtered out);
    ``None`` when a ``flat_map`` makes the number of outputs vary (no kernel then)."""
    fn: Callable[[Any], Any] | None = None
    for step in steps:
        if isinstance(step, Filter):
            fn = _filter(fn, step.fn)
        elif isinstance(step, Map):
            fn = step.fn if fn is None else _map(fn, step.fn)
        else:
            return None
    return fn if fn is not None else _identity


def _identity(value: Any) -> Any:
    return value


def _filter(
    prev: Callable[[Any], Any] | None, pred: Callable[[Any], object]
) -> Callable[[Any], Any]:
    if prev is None:
        return lambda v: v if pred(v) else SKIP

    def filtered(v: Any) -> Any:
        v = prev(v)
        return SKIP if v is SKIP or not pred(v) else v

    return filtered


def _map(prev: Callable[[Any], Any], fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def mapped(v: Any) -> Any:
        v = prev(v)
        return SKIP if v is SKIP else fn(v)

    return mapped


# -- append ------------------------------------------------------------------------------------


def append_kernels(
    fn: Callable[[Any], Any], label: str, source: str, partition: str
) -> tuple[LinesKernel, RecordsKernel]:
    """Loops adding ``fn``'s dict output of each record as a row (values, then ``source``,
    ``partition``, offset, ``0``) to ``groups[column names]``."""
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    skip = SKIP

    def not_a_dict(o: Any) -> TypeError:
        return TypeError(f"{label} needs dict records, got {type(o).__name__}")

    def run_lines(batch: JsonLines, groups: Groups, fail: LineFail) -> None:
        cols_prev: tuple[str, ...] | None = None
        rows: list[Row] = []
        pos = batch.start
        for line in batch.lines:
            try:
                v = loads(line)
            except decode_error:
                fail(line, None, None)
                pos += len(line) + 1
                continue
            if type(v) is not dict:
                fail(line, None, None)
                pos += len(line) + 1
                continue
            try:
                o = fn(v)
                if type(o) is not dict and o is not skip:
                    raise not_a_dict(o)
            except Exception as exc:
                fail(line, v, exc)
                pos += len(line) + 1
                continue
            if o is not skip:
                cols = tuple(o)
                if cols != cols_prev:
                    rows = groups.setdefault(cols, [])
                    cols_prev = cols
                rows.append((*o.values(), source, partition, pos, 0))
            pos += len(line) + 1

    def run_records(records: Sequence[SourceRecord], groups: Groups, fail: RecordFail) -> None:
        cols_prev: tuple[str, ...] | None = None
        rows: list[Row] = []
        for rec in records:
            v = rec.value
            if v is None:
                fail(rec, None)
                continue
            try:
                o = fn(v)
                if type(o) is not dict and o is not skip:
                    raise not_a_dict(o)
            except Exception as exc:
                fail(rec, exc)
                continue
            if o is not skip:
                cols = tuple(o)
                if cols != cols_prev:
                    rows = groups.setdefault(cols, [])
                    cols_prev = cols
                rows.append((*o.values(), source, partition, rec.offset, 0))

    return run_lines, run_records


# -- aggregate ----------------------------------------------------------------------------------

_LINES_HEAD = """\
def run_lines(batch, accs, fail):
    get = accs.get
    loads = _loads
    for line in batch.lines:
        try:
            v = loads(line)
        except decode_error:
            fail(line, None, None)
            continue
        if type(v) is not dict:
            fail(line, None, None)
            continue
        try:
{body}
        except Exception as exc:
            fail(line, v, exc)
"""

_RECORDS_HEAD = """\
def run_records(records, accs, fail):
    get = accs.get
    for rec in records:
        v = rec.value
        if v is None:
            fail(rec, None)
            continue
        try:
{body}
        except Exception as exc:
            fail(rec, exc)
"""


def _single_field(fn: Callable[[Any], Any]) -> str | None:
    """``name`` when ``fn`` is ``operator.itemgetter(name)`` (what ``key_by("name")`` uses)."""
    if type(fn) is not operator.itemgetter:
        return None
    items = fn.__reduce__()[1]
    return items[0] if len(items) == 1 and isinstance(items[0], str) else None


def aggregate_kernels(
    fn: Callable[[Any], Any], key_fn: Callable[[Any], Any], aggregates: Sequence[Aggregate]
) -> tuple[LinesKernel, RecordsKernel]:
    """Loops folding each record into ``accs[key]`` (one accumulator per aggregate, as
    :class:`Aggregate` ``start``/``add`` build them).

    The loop body is generated for the aggregate list so that ``count()`` and ``sum`` of ints
    and floats cost a few bytecodes each; anything else calls the aggregate's own ``start`` /
    ``add``. Every new accumulator value is computed before any is stored, so a record that
    raises leaves ``accs`` untouched.
    """
    ns: dict[str, Any] = {
        "_loads": orjson.loads,
        "decode_error": orjson.JSONDecodeError,
        "fn": fn,
        "key_fn": key_fn,
        "SKIP": SKIP,
        "int": int,
        "float": float,
        "type": type,
        "dict": dict,
        "Exception": Exception,
    }
    body = ["o = fn(v)", "if o is SKIP:", "    continue"] if fn is not _identity else ["o = v"]
    field = _single_field(key_fn)
    if field is not None:  # key_by("name"): subscript instead of calling an itemgetter
        ns["KEY"] = field
        body.append("k = o[KEY]")
    else:
        body.append("k = key_fn(o)")
    body.append("acc = get(k)")  # hashing the key may raise: before any input is read
    first: list[str] = []
    then: list[str] = []
    for j, agg in enumerate(aggregates):
        ns[f"A{j}"] = agg
        x = f"x{j}"
        if isinstance(agg.field, str):
            ns[f"F{j}"] = agg.field
            body.append(f"{x} = o[F{j}]")
        elif agg.field is not None:
            ns[f"E{j}"] = agg.field
            body.append(f"{x} = E{j}(o)")
        else:
            x = "None"
        fast_x = f"(type({x}) is int or type({x}) is float)"
        fast_c = f"(type(acc[{j}]) is int or type(acc[{j}]) is float)"
        if agg.kind == "count" and agg.field is None:
            first.append(f"a{j} = 1")
            then.append(f"a{j} = acc[{j}] + 1")
        elif agg.kind == "sum":
            first.append(f"a{j} = {x} if {fast_x} else A{j}.start({x})")
            then.append(
                f"a{j} = acc[{j}] + {x} if {fast_x} and {fast_c} else A{j}.add(acc[{j}], {x})"
            )
        else:
            first.append(f"a{j} = A{j}.start({x})")
            then.append(f"a{j} = A{j}.add(acc[{j}], {x})")
    n = len(aggregates)
    body.append("if acc is None:")
    body += ["    " + line for line in first]
    body.append("    accs[k] = [" + ", ".join(f"a{j}" for j in range(n)) + "]")
    body.append("else:")
    body += ["    " + line for line in then]
    body += [f"    acc[{j}] = a{j}" for j in range(n)]
    indented = "\n".join(" " * 12 + line for line in body)
    # code built from fixed templates, no input text; the file name marks its frames in
    # tracebacks as pgstream's, so an error's location is the user's function it called
    for head in (_LINES_HEAD, _RECORDS_HEAD):
        exec(compile(head.format(body=indented), KERNEL_FILENAME, "exec"), ns)
    run_lines: LinesKernel = ns["run_lines"]
    run_records: RecordsKernel = ns["run_records"]
    return run_lines, run_records

"""Fused evaluation loops for the common case: one source feeding one append or aggregate sink.

:meth:`Pipeline.evaluate <pgstream.runtime.pipeline.Pipeline.evaluate>` stages every record
against every plan, then applies it; that costs several calls and allocations per record. When a
partition feeds exactly one append or aggregate plan through ``map``/``filter`` steps, a kernel
does the same work in one loop per batch: decode the payload (for undecoded input), run the
composed steps, and add the result to the batch's output.

The semantics are the general loop's: a record that fails (undecodable, an operator raising, a
non-dict output, a bad aggregate input) is handed to ``fail`` *before* it changed anything, and
the caller turns it into a dead letter (or stops). Undecoded input is a source-neutral
:class:`~pgstream.sources.raw.RawBatch` (a file's lines, a message source's values). Edge cases
the fast path does not handle itself (a decode error, a value of an unusual type for ``sum``)
go to the same code the general loop uses, so both paths produce identical outputs. ``fail``
gets the exception itself, with its traceback, so the dead letter can name the user's file and
line.

The kernels own no rule of their own: the steps are :func:`pgstream.operators.steps.compose`'s
function, an aggregate's inline code comes from :meth:`Aggregate.kernel_code
<pgstream.operators.aggregates.Aggregate.kernel_code>`, and an append row has the layout of
:func:`pgstream.sinks.append.make_row` (the kernel builds it inline; the tests compare it with
the general loop's rows).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from pgstream.operators.aggregates import Aggregate
from pgstream.operators.steps import SKIP, identity
from pgstream.sources.base import SourceRecord
from pgstream.sources.raw import RawBatch

Row = tuple[Any, ...]
Groups = dict[tuple[str, ...], list[Row]]
Accumulators = dict[Any, list[Any]]

#: ``fail(payload, value, exc)`` for undecoded input: ``value`` is the decoded record (``None``
#: and ``exc`` ``None`` when the payload did not decode to an object). Failures come in payload
#: order and ``payload`` is the very object of ``batch.payloads``, which is how the caller finds
#: its offset (only then: offsets are not computed on the way).
RawFail = Callable[[bytes, Any, "BaseException | None"], None]
#: ``fail(record, exc)`` for decoded records (``exc`` ``None`` when the record has no value).
RecordFail = Callable[[SourceRecord, "BaseException | None"], None]

#: the file names of generated kernel code in tracebacks
KERNEL_FILENAME = "<pgstream aggregate kernel>"
APPEND_KERNEL_FILENAME = "<pgstream append kernel>"

#: ``kernel(batch, target, fail)``: ``target`` is the plan's groups (append) or accumulators
RawKernel = Callable[[RawBatch, Any, RawFail], None]
RecordsKernel = Callable[[Sequence[SourceRecord], Any, RecordFail], None]


# -- append ------------------------------------------------------------------------------------


def append_kernels(
    fn: Callable[[Any], Any], label: str, source: str, partition: str
) -> tuple[RawKernel, RecordsKernel]:
    """Loops adding ``fn``'s dict output of each record as a row (values, then ``source``,
    ``partition``, offset, ``0``: :func:`~pgstream.sinks.append.make_row`) to
    ``groups[column names]``."""
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    skip = SKIP

    def not_a_dict(o: Any) -> TypeError:
        return TypeError(f"{label} needs dict records, got {type(o).__name__}")

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

    ns: dict[str, Any] = {
        "loads": loads,
        "decode_error": decode_error,
        "fn": fn,
        "skip": skip,
        "not_a_dict": not_a_dict,
        "source": source,
        "partition": partition,
    }
    # code built from fixed templates, no input text (see aggregate_kernels)
    for name, offsets in _APPEND_OFFSETS.items():
        code = _APPEND_RAW.format(name=name, decode=_DECODE_PAYLOAD, **offsets)
        exec(compile(code, APPEND_KERNEL_FILENAME, "exec"), ns)
    run_packed: RawKernel = ns["run_packed"]
    run_listed: RawKernel = ns["run_listed"]

    def run_raw(batch: RawBatch, groups: Groups, fail: RawFail) -> None:
        (run_listed if batch.gap is None else run_packed)(batch, groups, fail)

    return run_raw, run_records


#: the loop over undecoded payloads for an append plan; ``{first}`` and ``{next}`` make ``pos``
#: the one rule for an undecoded payload, in every raw loop: a JSON object, else ``fail``
#: (``fail(payload, None, None)``: the caller decodes it again for the dead letter's error)
_DECODE_PAYLOAD = """\
        try:
            v = loads(payload)
        except decode_error:
            fail(payload, None, None)
            continue
        if type(v) is not dict:
            fail(payload, None, None)
            continue
"""

#: the offset of each payload, computed from the payload lengths when the batch's payloads lie
#: back to back ``gap`` bytes apart (``packed``, a file's lines), taken from its list otherwise
_APPEND_RAW = """\
def run_{name}(batch, groups, fail):
    cols_prev = None
    rows = []
{first}
    for payload in batch.payloads:
{next}
{decode}        try:
            o = fn(v)
            if type(o) is not dict and o is not skip:
                raise not_a_dict(o)
        except Exception as exc:
            fail(payload, v, exc)
            continue
        if o is not skip:
            cols = tuple(o)
            if cols != cols_prev:
                rows = groups.setdefault(cols, [])
                cols_prev = cols
            rows.append((*o.values(), source, partition, pos, 0))
"""

_APPEND_OFFSETS = {
    "packed": {
        "first": "    after = batch.start\n    gap = batch.gap",
        "next": "        pos = after\n        after += len(payload) + gap",
    },
    "listed": {
        "first": "    next_offset = iter(batch.offsets()).__next__",
        "next": "        pos = next_offset()",
    },
}


# -- aggregate ----------------------------------------------------------------------------------

_RAW_HEAD = """\
def run_raw(batch, accs, fail):
    get = accs.get
    loads = _loads
    for payload in batch.payloads:
{decode}        try:
{body}
        except Exception as exc:
            fail(payload, v, exc)
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
) -> tuple[RawKernel, RecordsKernel]:
    """Loops folding each record into ``accs[key]`` (one accumulator per aggregate, as
    :class:`Aggregate` ``start``/``add`` build them, inlined by :meth:`Aggregate.kernel_code`).

    Every new accumulator value is computed before any is stored, so a record that raises
    leaves ``accs`` untouched.
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
    body = ["o = fn(v)", "if o is SKIP:", "    continue"] if fn is not identity else ["o = v"]
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
        start, add = agg.kernel_code(f"A{j}", x, f"acc[{j}]")
        first.append(f"a{j} = {start}")
        then.append(f"a{j} = {add}")
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
    for head in (_RAW_HEAD, _RECORDS_HEAD):
        code = head.format(body=indented, decode=_DECODE_PAYLOAD)
        exec(compile(code, KERNEL_FILENAME, "exec"), ns)
    run_raw: RawKernel = ns["run_raw"]
    run_records: RecordsKernel = ns["run_records"]
    return run_raw, run_records

"""Fused evaluation loops for the common case: one source feeding one append or aggregate sink.

:meth:`Pipeline.evaluate <pgstream.runtime.pipeline.Pipeline.evaluate>` stages every record
against every plan, then applies it; that costs several calls and allocations per record. When a
partition feeds exactly one append or aggregate plan through ``map``/``filter`` steps, a kernel
does the same work in one loop per batch: decode the payload (for undecoded input), run the
composed steps, and add the result to the batch's output.

The semantics are the general loop's: a record that fails (undecodable, an operator raising, a
non-dict output, a bad aggregate input) is handed to ``fail`` *before* it changed anything, and
the caller turns it into a dead letter (or stops). Undecoded input is a source-neutral
:class:`~pgstream.sources.raw.RawBatch` (a file's lines, a message source's values) or a
table's row tuples (:class:`~pgstream.sources.raw.TableRows`): a row becomes a dict only when a
Python function will see it; an aggregate keyed and fed by field names reads the tuple itself.
Row loops are compiled once per column layout (the names are known when the rows arrive). Edge cases
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
from pgstream.sources.raw import RawBatch, TableRows

Row = tuple[Any, ...]
Groups = dict[tuple[str, ...], list[Row]]
Accumulators = dict[Any, list[Any]]

#: ``fail(payload, value, exc)`` for undecoded input: ``value`` is the decoded record (``None``
#: and ``exc`` ``None`` when the payload did not decode to an object; a table row always
#: decodes). Failures come in payload
#: order and ``payload`` is the very object of ``batch.payloads``, which is how the caller finds
#: its offset (only then: offsets are not computed on the way).
RawFail = Callable[[Any, Any, "BaseException | None"], None]
#: ``fail(record, exc)`` for decoded records (``exc`` ``None`` when the record has no value).
RecordFail = Callable[[SourceRecord, "BaseException | None"], None]

#: the file names of generated kernel code in tracebacks
KERNEL_FILENAME = "<pgstream aggregate kernel>"
APPEND_KERNEL_FILENAME = "<pgstream append kernel>"

#: ``kernel(batch, target, fail)``: ``target`` is the plan's groups (append) or accumulators
RawKernel = Callable[[RawBatch, Any, RawFail], None]
RecordsKernel = Callable[[Sequence[SourceRecord], Any, RecordFail], None]


# -- append ------------------------------------------------------------------------------------

#: ``values(o)``: an output's values in the order of its group's column names
Values = Callable[[dict[str, Any]], tuple[Any, ...]]


def _no_values(o: dict[str, Any]) -> tuple[Any, ...]:
    raise KeyError("no shape yet")


#: the shape before the first output: width -1 matches no dict, so it takes the slow path
_NO_SHAPE: tuple[int, Values] = (-1, _no_values)


def _shape(cols: tuple[str, ...]) -> tuple[int, Values]:
    """How an append loop takes the values of outputs like the one named ``cols``:
    ``values(o)`` (an itemgetter) reads them in the order of ``cols`` and raises
    ``KeyError`` if ``o`` lacks one, so an output of ``len(cols)`` keys that it reads has
    exactly these keys and belongs to the group ``cols`` (in whatever order its keys are);
    any other output takes the slow path (``tuple(o)``, its own group). Outputs of fewer
    than two columns always do (a one-key itemgetter returns no tuple)."""
    if len(cols) < 2:
        return _NO_SHAPE
    return len(cols), operator.itemgetter(*cols)


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

    ns: dict[str, Any] = {
        "loads": loads,
        "decode_error": decode_error,
        "fn": fn,
        "skip": skip,
        "not_a_dict": not_a_dict,
        "source": source,
        "partition": partition,
        "shape": _shape,
        "no_shape": _NO_SHAPE,
    }
    # code built from fixed templates, no input text (see aggregate_kernels)
    for name, offsets in _APPEND_OFFSETS.items():
        code = _APPEND_RAW.format(name=name, decode=_DECODE_PAYLOAD, **offsets)
        exec(compile(code, APPEND_KERNEL_FILENAME, "exec"), ns)
    exec(compile(_APPEND_RECORDS, APPEND_KERNEL_FILENAME, "exec"), ns)
    run_records: RecordsKernel = ns["run_records"]
    run_packed: RawKernel = ns["run_packed"]
    run_listed: RawKernel = ns["run_listed"]

    run_rows = _per_layout(lambda names, offset_index: _append_rows(ns, names, offset_index))

    def run_raw(batch: RawBatch, groups: Groups, fail: RawFail) -> None:
        if type(batch) is TableRows:
            run_rows(batch, groups, fail)
        else:
            (run_listed if batch.gap is None else run_packed)(batch, groups, fail)

    return run_raw, run_records


def _append_rows(ns: dict[str, Any], names: tuple[str, ...], offset_index: int) -> RawKernel:
    """The append loop over rows of the layout ``names`` (offset at ``offset_index``)."""
    rns = dict(ns, **_name_constants(names))
    code = _APPEND_ROWS.format(record=_row_dict(len(names)), offset=int(offset_index))
    exec(compile(code, APPEND_KERNEL_FILENAME, "exec"), rns)
    run: RawKernel = rns["run_rows"]
    return run


def _name_constants(names: tuple[str, ...]) -> dict[str, str]:
    """``N0``, ``N1``...: the field names a compiled row loop refers to (never in its text)."""
    return {f"N{i}": name for i, name in enumerate(names)}


def _row_dict(n: int) -> str:
    """The expression building row ``row``'s record from its first ``n`` values."""
    return "{" + ", ".join(f"N{i}: row[{i}]" for i in range(n)) + "}"


def _per_layout(compile_rows: Callable[[tuple[str, ...], int], RawKernel]) -> RawKernel:
    """A row loop that compiles (once) and runs the loop for each batch's column layout."""
    compiled: dict[tuple[tuple[str, ...], int], RawKernel] = {}

    def run(batch: Any, target: Any, fail: RawFail) -> None:
        layout = (batch.names, batch.offset_index)
        loop = compiled.get(layout)
        if loop is None:
            loop = compiled[layout] = compile_rows(*layout)
        loop(batch, target, fail)

    return run


#: the loop over a table's row tuples for an append plan (``{record}``: see :func:`_row_dict`)
_APPEND_ROWS = """\
def run_rows(batch, groups, fail):
    width, values = no_shape
    rows = []
    for row in batch.rows:
        v = {record}
        try:
            o = fn(v)
            if type(o) is not dict and o is not skip:
                raise not_a_dict(o)
        except Exception as exc:
            fail(row, v, exc)
            continue
        if o is not skip:
            if len(o) == width:
                try:
                    rows.append(values(o) + (source, partition, row[{offset}], 0))
                    continue
                except KeyError:
                    pass
            cols = tuple(o)
            rows = groups.setdefault(cols, [])
            width, values = shape(cols)
            rows.append((*o.values(), source, partition, row[{offset}], 0))
"""


#: the loop over decoded records for an append plan
_APPEND_RECORDS = """\
def run_records(records, groups, fail):
    width, values = no_shape
    rows = []
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
            if len(o) == width:
                try:
                    rows.append(values(o) + (source, partition, rec.offset, 0))
                    continue
                except KeyError:
                    pass
            cols = tuple(o)
            rows = groups.setdefault(cols, [])
            width, values = shape(cols)
            rows.append((*o.values(), source, partition, rec.offset, 0))
"""


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
    width, values = no_shape
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
            if len(o) == width:
                try:
                    rows.append(values(o) + (source, partition, pos, 0))
                    continue
                except KeyError:
                    pass
            cols = tuple(o)
            rows = groups.setdefault(cols, [])
            width, values = shape(cols)
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


_ROWS_HEAD = """\
def run_rows(batch, accs, fail):
    get = accs.get
    for row in batch.rows:
{decode}        try:
{body}
        except Exception as exc:
            fail(row, {record}, exc)
"""


def aggregate_kernels(
    fn: Callable[[Any], Any], key_fn: Callable[[Any], Any], aggregates: Sequence[Aggregate]
) -> tuple[RawKernel, RecordsKernel]:
    """Loops folding each record into ``accs[key]`` (one accumulator per aggregate, as
    :class:`Aggregate` ``start``/``add`` build them, inlined by :meth:`Aggregate.kernel_code`).

    Every new accumulator value is computed before any is stored, so a record that raises
    leaves ``accs`` untouched. Over a table's rows, a plan with no steps whose key and
    aggregate inputs are fields of the rows reads them from the tuples (no dict per row).
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
    for j, agg in enumerate(aggregates):
        ns[f"A{j}"] = agg
        ns[f"F{j}"] = agg.field if isinstance(agg.field, str) else None
        ns[f"E{j}"] = agg.field
    key_field = _single_field(key_fn)
    ns["KEY"] = key_field
    indented = _indent(_aggregate_body(fn, key_field, aggregates, None))
    # code built from fixed templates, no input text; the file name marks its frames in
    # tracebacks as pgstream's, so an error's location is the user's function it called
    for head in (_RAW_HEAD, _RECORDS_HEAD):
        code = head.format(body=indented, decode=_DECODE_PAYLOAD)
        exec(compile(code, KERNEL_FILENAME, "exec"), ns)
    json_raw: RawKernel = ns["run_raw"]
    run_records: RecordsKernel = ns["run_records"]
    fields = [key_field] + [a.field for a in aggregates if a.field is not None]
    from_tuples = fn is identity and all(isinstance(f, str) for f in fields)

    def compile_rows(names: tuple[str, ...], offset_index: int) -> RawKernel:
        rns = dict(ns, **_name_constants(names))
        record = _row_dict(len(names))
        if from_tuples and all(f in names for f in fields):
            index = {name: i for i, name in enumerate(names)}
            body = _aggregate_body(fn, key_field, aggregates, index)
            code = _ROWS_HEAD.format(decode="", body=_indent(body), record=record)
        else:
            body = _aggregate_body(fn, key_field, aggregates, None)
            decode = f"        v = {record}\n"
            code = _ROWS_HEAD.format(decode=decode, body=_indent(body), record="v")
        exec(compile(code, KERNEL_FILENAME, "exec"), rns)
        run: RawKernel = rns["run_rows"]
        return run

    run_rows = _per_layout(compile_rows)

    def run_raw(batch: RawBatch, accs: Accumulators, fail: RawFail) -> None:
        (run_rows if type(batch) is TableRows else json_raw)(batch, accs, fail)

    return run_raw, run_records


def _indent(body: list[str]) -> str:
    return "\n".join(" " * 12 + line for line in body)


def _aggregate_body(
    fn: Callable[[Any], Any],
    key_field: str | None,
    aggregates: Sequence[Aggregate],
    index: dict[str, int] | None,
) -> list[str]:
    """The lines folding one record ``v`` into ``accs`` (see :func:`aggregate_kernels`); with
    ``index`` (field name -> position), the key and the inputs are read from the tuple
    ``row`` instead (the plan has no steps and reads fields only)."""
    if index is not None:
        body = [f"k = row[{int(index[key_field])}]"] if key_field is not None else []
    else:
        body = ["o = fn(v)", "if o is SKIP:", "    continue"] if fn is not identity else ["o = v"]
        # key_by("name"): subscript instead of calling an itemgetter
        body.append("k = o[KEY]" if key_field is not None else "k = key_fn(o)")
    body.append("acc = get(k)")  # hashing the key may raise: before any input is read
    first: list[str] = []
    then: list[str] = []
    for j, agg in enumerate(aggregates):
        x = f"x{j}"
        if isinstance(agg.field, str):
            body.append(f"{x} = row[{int(index[agg.field])}]" if index else f"{x} = o[F{j}]")
        elif agg.field is not None:
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
    return body

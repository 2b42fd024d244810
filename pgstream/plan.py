"""A job's plan: what it reads, what it computes and where it writes, as plain JSON.

``describe(app)`` is the plan recorded in ``pgstream.jobs.plan`` (see
``/work/briefs/plan_contract.md`` for its shape), ``fingerprint(plan)`` its hash and
``diff(old, new)`` the changes between two plans in plain words, each with its consequence.
``pgstream run`` compares the recorded plan with the app's (:mod:`pgstream.runtime.jobcheck`)
and ``pgstream verify`` judges each batch by the plan it ran under.

Code fingerprints of user callables (map/filter/flat_map functions, key functions, fold
functions, aggregate field functions, ``@app.batch`` handlers) hash their dedented source
text when Python can find it (``inspect.getsource``), else their code object (bytecode,
constants, names). Not part of a fingerprint: values a callable captures from enclosing
scopes or globals (a closure's threshold, a module constant) and the helper functions it
calls. Changing those changes the results without changing the plan. A lambda's source
is the whole statement it is written in, so any edit to that statement counts as a change.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from pgstream.api import App, BatchHandlerSpec, SinkSpec
from pgstream.errors import JobStateError
from pgstream.expressions import Expr
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.fold import Fold
from pgstream.operators.keys import KeySpec
from pgstream.operators.lookup import Lookup
from pgstream.operators.steps import Filter, Map, Step

Plan = dict[str, Any]

__all__ = [
    "Change",
    "Plan",
    "code_fingerprint",
    "describe",
    "diff",
    "fingerprint",
    "renamed_streams",
    "sink_entries",
    "sink_status",
    "stream_sources",
]


# -- describing an app ------------------------------------------------------------------------


def describe(app: App) -> Plan:
    """The plan of ``app``: its streams and their sources, its sinks and its handlers."""
    return {
        "streams": {name: {"source": src.identity()} for name, src in app.sources.items()},
        "sinks": [_sink(spec) for spec in app.sinks],
        "handlers": [_handler(h) for h in app.handlers],
    }


def fingerprint(plan: Plan) -> str:
    """SHA-256 of the plan's canonical JSON (sorted keys)."""
    return hashlib.sha256(orjson.dumps(plan, option=orjson.OPT_SORT_KEYS)).hexdigest()


def code_fingerprint(fn: Callable[..., Any]) -> str:
    """A short hash of a callable's source (``src:...``) or, without source, its code
    (``code:...``). Closure values and called helpers are not included (see the module doc)."""
    try:
        text = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if isinstance(code, types.CodeType):
            return "code:" + _digest(_code_bytes(code))
        kind = type(fn)
        return "object:" + _digest(f"{kind.__module__}.{kind.__qualname__}".encode())
    return "src:" + _digest(text.encode())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _code_bytes(code: types.CodeType) -> bytes:
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        nested = isinstance(const, types.CodeType)
        parts.append(_code_bytes(const) if nested else repr(const).encode())
    return b"\0".join(parts)


def _callable_or_field(value: str | Expr | Callable[..., Any] | None) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Expr):
        return {"expr": value.describe()}
    return {"code": code_fingerprint(value)}


def _steps(steps: Sequence[Step]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for step in steps:
        if isinstance(step, Lookup):
            out.append(step.describe())
            continue
        op = "filter" if isinstance(step, Filter) else "map"
        op = op if isinstance(step, (Filter, Map)) else "flat_map"
        if isinstance(step, (Filter, Map)) and step.expr is not None:
            op = "select" if isinstance(step, Map) else op
            out.append({"op": op, "expr": step.expr.describe()})
        else:
            out.append({"op": op, "code": code_fingerprint(step.fn)})
    return out


def _key(key: KeySpec) -> dict[str, Any]:
    by = key.by
    entry: dict[str, Any] = {
        "columns": list(key.columns),
        "by": list(by) if isinstance(by, tuple) else _callable_or_field(by),
    }
    if key.exprs is not None:
        entry["by"] = {"expr": [e.describe() for e in key.exprs]}
    elif by is None:  # a KeySpec built by hand: its function is all there is
        entry["by"] = {"code": code_fingerprint(key.fn)}
    if key.window is not None:
        seconds, time = key.window
        entry["window"] = {"tumbling_seconds": seconds, "time": _callable_or_field(time)}
    return entry


def _aggregate(agg: Aggregate) -> dict[str, Any]:
    return {"name": agg.name, "kind": agg.kind, "field": _callable_or_field(agg.field)}


def _fold(fold: Fold) -> dict[str, Any]:
    initial: Any
    if callable(fold.initial):
        initial = {"code": code_fingerprint(fold.initial)}
    else:
        try:
            initial = {"value": orjson.loads(orjson.dumps(fold.initial))}
        except TypeError:
            initial = {"repr": repr(fold.initial)}
    return {"initial": initial, "code": code_fingerprint(fold.fn)}


def _sink(spec: SinkSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "stream": spec.stream,
        "table": spec.table,
        "kind": spec.kind,
        "steps": _steps(spec.steps),
    }
    if spec.key is not None:
        entry["key"] = _key(spec.key)
        if spec.window is not None and "window" in entry["key"]:
            window = entry["key"]["window"]
            extra = spec.window.describe()
            if "every" in extra:  # hopping: its size under its own name
                window["hopping_seconds"] = window.pop("tumbling_seconds")
            if "session_gap" in extra:  # sessions: no size, their gap
                window.pop("tumbling_seconds")
            window.update(extra)
    if spec.aggregates:
        entry["aggregates"] = [_aggregate(a) for a in spec.aggregates]
    if spec.fold is not None:
        entry["operator"] = spec.operator_id
        entry["fold"] = _fold(spec.fold)
    if spec.repartition is not None:
        rep = spec.repartition
        entry["repartition"] = {
            "from": rep.upstream,
            "steps": _steps(rep.steps),
            "partitions": rep.partitions,
        }
    return entry


def _handler(h: BatchHandlerSpec) -> dict[str, Any]:
    return {
        "stream": h.stream,
        "name": h.name,
        "steps": _steps(h.steps),
        "code": code_fingerprint(h.fn),
    }


# -- comparing two plans ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two plans: what changed, in plain words, and what it means."""

    kind: str  # stream-added|stream-removed|stream-renamed|source-changed|sink-added|...
    what: str
    consequence: str
    table: str | None = None  # the sink table concerned, if any

    def text(self) -> str:
        """``<what>: <consequence>``."""
        return f"{self.what}: {self.consequence}"


def stream_sources(plan: Plan) -> dict[str, str]:
    """Stream name -> source identity."""
    return {name: str(s.get("source")) for name, s in plan.get("streams", {}).items()}


def renamed_streams(old: Plan, new: Plan) -> dict[str, str]:
    """Streams that look renamed: old name -> new name, when a stream is gone from ``old``
    and exactly one new stream of ``new`` reads the same source (same identity)."""
    before, after = stream_sources(old), stream_sources(new)
    gone = {n: src for n, src in before.items() if n not in after}
    added = {n: src for n, src in after.items() if n not in before}
    out: dict[str, str] = {}
    for name, src in gone.items():
        same = [n for n, s in added.items() if s == src and n not in out.values()]
        if len(same) == 1:
            out[name] = same[0]
    return out


def sink_entries(plan: Plan, rename: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The plan's sinks by a stable id ``<stream>-><table>`` (``#n`` for repeats), with
    stream names mapped through ``rename`` (old -> new)."""
    rename = rename or {}
    out: dict[str, dict[str, Any]] = {}
    for entry in plan.get("sinks", []):
        stream = rename.get(entry["stream"], entry["stream"])
        base = f"{stream}->{entry['table']}"
        sid, n = base, 1
        while sid in out:
            n += 1
            sid = f"{base}#{n}"
        out[sid] = {**entry, "stream": stream}
        operator = entry.get("operator")
        prefix = f"{entry['stream']}:"
        if stream != entry["stream"] and operator and operator.startswith(prefix):
            out[sid]["operator"] = f"{stream}:{operator[len(prefix):]}"  # a default fold id
    return out


def sink_status(old: Plan, new: Plan) -> dict[str, str]:
    """For each sink of ``new`` (by :func:`sink_entries` id): ``"same"`` if ``old`` had it
    unchanged (steps, key, aggregates, fold), ``"absent"`` if ``old`` had no such sink,
    ``"changed"`` otherwise. Renamed streams are followed; sources are not compared (the
    runtime refuses a checkpoint of another source, see :mod:`pgstream.runtime.jobcheck`)."""
    before = sink_entries(old, renamed_streams(old, new))
    out = {}
    for sid, entry in sink_entries(new).items():
        was = before.get(sid)
        out[sid] = "absent" if was is None else "same" if was == entry else "changed"
    return out


def _handlers(plan: Plan, rename: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for h in plan.get("handlers", []):
        stream = rename.get(h["stream"], h["stream"])
        out[(stream, h["name"])] = {**h, "stream": stream}
    return out


def diff(old: Plan, new: Plan, *, target: str = "MODULE:APP") -> list[Change]:
    """Every change from ``old`` to ``new``, in plain words with its consequence.

    ``target`` (the ``MODULE:APP`` of the command line) is used in the suggested commands.
    """
    renames = renamed_streams(old, new)
    changes = _stream_changes(old, new, renames, target)
    changes += _sink_changes(sink_entries(old, renames), sink_entries(new))
    changes += _handler_changes(_handlers(old, renames), _handlers(new, {}))
    return changes


def _stream_changes(old: Plan, new: Plan, renames: dict[str, str], target: str) -> list[Change]:
    before, after = stream_sources(old), stream_sources(new)
    changes: list[Change] = []
    for name, new_name in renames.items():
        changes.append(
            Change(
                "stream-renamed",
                f"stream {name!r} is gone and the new stream {new_name!r} reads the same source "
                f"({before[name]})",
                f"if you renamed it, run `pgstream job rename {target} --stream "
                f"{name}={new_name}` first, which keeps its offsets; accepted as it is, "
                f"{new_name!r} reads its source again from the start and every record is "
                "counted twice",
            )
        )
    for name, src in before.items():
        if name in renames:
            continue
        if name not in after:
            changes.append(
                Change(
                    "stream-removed",
                    f"stream {name!r} ({src}) was removed",
                    f"its checkpoint stays; retire it with `pgstream job retire {target} "
                    f"--stream {name}`",
                )
            )
        elif after[name] != src:
            changes.append(
                Change(
                    "source-changed",
                    f"stream {name!r} now reads {after[name]} instead of {src}",
                    "its offsets belong to the old source; a stream with a checkpoint is "
                    f"refused (start it over with `pgstream job reset {target} --stream {name}`)",
                )
            )
    for name, src in after.items():
        if name not in before and name not in renames.values():
            changes.append(
                Change(
                    "stream-added",
                    f"new stream {name!r} ({src})",
                    "it reads its source from the start",
                )
            )
    return changes


_KEYED_WORDS = "keys changed: the table mixes old and new keys; aggregates are inconsistent"


def _sink_changes(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[Change]:
    changes: list[Change] = []
    for sid, entry in old.items():
        if sid not in new:
            changes.append(
                Change(
                    "sink-removed",
                    f"sink {entry['table']} ({entry['kind']} from stream {entry['stream']!r}) "
                    "was removed",
                    "the table keeps its rows but gets no new ones",
                    entry["table"],
                )
            )
    for sid, entry in new.items():
        before = old.get(sid)
        table = entry["table"]
        if before is None:
            changes.append(
                Change(
                    "sink-added",
                    f"new sink {table} ({entry['kind']} from stream {entry['stream']!r})",
                    "starts empty: it gets only records after this point, not history",
                    table,
                )
            )
            continue
        changes += _entry_changes(before, entry)
    return changes


def _entry_changes(before: dict[str, Any], entry: dict[str, Any]) -> list[Change]:
    table, keyed = entry["table"], entry["kind"] != "append"
    changes: list[Change] = []
    if before["kind"] != entry["kind"]:
        return [
            Change(
                "sink-changed",
                f"sink {table} changed from {before['kind']} to {entry['kind']}",
                "rows already written were made by the old kind of sink",
                table,
            )
        ]
    if before.get("steps") != entry.get("steps"):
        what = f"the map/filter/flat_map code feeding {table} changed"
        why = _KEYED_WORDS if keyed else "rows already written keep the old logic"
        changes.append(Change("code-changed", what, why, table))
    changes += _repartition_changes(before.get("repartition"), entry.get("repartition"), table)
    for part, words in (
        ("key", "key or window"),
        ("aggregates", "aggregates"),
        ("fold", "fold function or initial state"),
    ):
        if before.get(part) != entry.get(part):
            changes.append(
                Change("key-changed", f"the {words} of {table} changed", _KEYED_WORDS, table)
            )
    if before.get("operator") != entry.get("operator"):
        changes.append(
            Change(
                "key-changed",
                f"the fold operator of {table} was renamed from {before.get('operator')!r} "
                f"to {entry.get('operator')!r}",
                "its state starts empty; " + _KEYED_WORDS,
                table,
            )
        )
    return changes


def _repartition_changes(
    before: dict[str, Any] | None, after: dict[str, Any] | None, table: str
) -> list[Change]:
    """What changed in the repartition feeding a fold (its source stream, the code before
    ``key_by``, its partition count)."""
    if before == after:
        return []
    if before is None or after is None:
        what = f"the fold into {table} " + ("now" if after else "no longer") + " repartitions"
        return [Change("key-changed", what, _KEYED_WORDS, table)]
    if before.get("steps") != after.get("steps"):
        what = f"the map/filter/flat_map code feeding {table} (before its repartition) changed"
        return [Change("code-changed", what, _KEYED_WORDS, table)]
    what = (
        f"the repartition feeding {table} changed ({before.get('from')!r} in "
        f"{before.get('partitions')} partitions -> {after.get('from')!r} in "
        f"{after.get('partitions')})"
    )
    return [Change("key-changed", what, _KEYED_WORDS, table)]


def _handler_changes(
    old: dict[tuple[str, str], dict[str, Any]], new: dict[tuple[str, str], dict[str, Any]]
) -> list[Change]:
    changes: list[Change] = []
    for (stream, name), h in new.items():
        before = old.get((stream, name))
        if before is None:
            changes.append(
                Change(
                    "handler-added",
                    f"new @app.batch handler {name} on stream {stream!r}",
                    "it sees only batches after this point",
                )
            )
        elif before != h:
            changes.append(
                Change(
                    "handler-changed",
                    f"@app.batch handler {name} on stream {stream!r} changed",
                    "what it wrote before keeps the old logic",
                )
            )
    for stream, name in old.keys() - new.keys():
        changes.append(
            Change(
                "handler-removed",
                f"@app.batch handler {name} on stream {stream!r} was removed",
                "what it wrote stays",
            )
        )
    return changes


def rename_stream(plan: Plan, old: str, new: str) -> Plan:
    """``plan`` with stream ``old`` called ``new``: the ``streams`` key, every ``"stream"``
    value of sinks and handlers, and default fold operator ids ``"<old>:fold:<table>"``."""
    out = copy.deepcopy(plan)
    streams = out.get("streams")
    if isinstance(streams, dict) and old in streams:
        if new in streams:
            raise JobStateError(
                f"the recorded plan already has both streams {old!r} and {new!r}",
                hint="`pgstream job list` shows the job; retire one of them first",
            )
        out["streams"] = {new if k == old else k: v for k, v in streams.items()}
    for section in ("sinks", "handlers"):
        for item in out.get(section) or []:
            if not isinstance(item, dict) or item.get("stream") != old:
                continue
            item["stream"] = new
            if item.get("operator") == f"{old}:fold:{item.get('table')}":
                item["operator"] = f"{new}:fold:{item['table']}"
    return out

"""The public pipeline API: :class:`App`, :class:`Stream` and friends.

Streams are immutable descriptions; nothing runs until ``pgstream run`` (or
:func:`pgstream.runtime.worker.run_app`) compiles the app into per-source pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from pgstream.config import OnError, Settings
from pgstream.errors import ConfigError
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.eventtime import EventClock
from pgstream.operators.fold import Fold
from pgstream.operators.keys import KeySpec
from pgstream.operators.lookup import Lookup
from pgstream.operators.steps import Filter, FlatMap, Map, Step
from pgstream.operators.windows import Tumbling, windowed_key
from pgstream.sources.base import Source

SinkKind = Literal["append", "aggregate", "fold"]


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """One ``to_table`` call: where records come from, what happens to them, where they go."""

    stream: str
    steps: tuple[Step, ...]
    kind: SinkKind
    table: str
    key: KeySpec | None = None
    aggregates: tuple[Aggregate, ...] = ()
    fold: Fold | None = None
    operator_id: str = ""


@dataclass(frozen=True, slots=True)
class BatchHandlerSpec:
    """A user function run inside every checkpoint transaction of ``stream``."""

    stream: str
    steps: tuple[Step, ...]
    fn: Callable[[Batch], None]
    name: str


@dataclass(slots=True)
class Batch:
    """What an ``@app.batch`` handler sees: the batch's records and its transaction."""

    job: str
    source: str
    partition: str
    start_offset: int
    end_offset: int
    records: list[Any]
    cursor: psycopg.Cursor[Any] = field(repr=False)

    def execute(self, query: Any, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        """Run SQL inside the checkpoint transaction (commits or rolls back with the batch)."""
        self.cursor.execute(query, params)


class App:
    """A job: named sources, their pipelines and sinks, and the job's settings."""

    def __init__(
        self,
        name: str,
        *,
        batch_size: int | None = None,
        target_latency: float | None = None,
        max_interval: float | None = None,
        poll_interval: float | None = None,
        lease_seconds: float | None = None,
        on_error: OnError | None = None,
        max_sink_rejections: int | None = None,
    ) -> None:
        if not name or not isinstance(name, str):
            raise ConfigError("App needs a non-empty job name, e.g. ps.App('shop')")
        self.name = name
        self.settings = Settings().with_overrides(
            batch_size=batch_size,
            target_latency=target_latency,
            max_interval=max_interval,
            poll_interval=poll_interval,
            lease_seconds=lease_seconds,
            on_error=on_error,
            max_sink_rejections=max_sink_rejections,
        )
        self.settings.validate()
        self.sources: dict[str, Source] = {}
        self.sinks: list[SinkSpec] = []
        self.handlers: list[BatchHandlerSpec] = []

    def stream(self, name: str, source: Source) -> Stream:
        """Declare an input stream ``name`` read from ``source``."""
        if name in self.sources:
            raise ConfigError(f"stream {name!r} is declared twice in app {self.name!r}")
        if not isinstance(source, Source):
            raise ConfigError(f"stream {name!r}: {source!r} is not a pgstream source")
        self.sources[name] = source
        return Stream(self, name, ())

    def batch(self, stream: Stream) -> Callable[[Callable[[Batch], None]], Callable[[Batch], None]]:
        """Decorator: run ``fn(batch)`` inside every checkpoint transaction of ``stream``."""

        def register(fn: Callable[[Batch], None]) -> Callable[[Batch], None]:
            name = getattr(fn, "__name__", "batch_handler")
            self.handlers.append(BatchHandlerSpec(stream.source, stream.steps, fn, name))
            return fn

        return register

    def _add_sink(self, spec: SinkSpec) -> None:
        """Add a sink; several may share a table only if all append, or all aggregate with
        the same key columns, window and aggregate columns (a union: deltas merge in SQL)."""
        clash = [s for s in self.sinks if s.table == spec.table]
        if not clash:
            self.sinks.append(spec)
            return
        kinds = {s.kind for s in clash} | {spec.kind}
        if kinds == {"aggregate"}:
            first, theirs = _aggregate_shape(clash[0]), _aggregate_shape(spec)
            if first != theirs:
                raise ConfigError(
                    f"table {spec.table!r} gets aggregates from streams {clash[0].stream!r} "
                    f"and {spec.stream!r} of different shapes ({_show_shape(first)} vs "
                    f"{_show_shape(theirs)}); streams may feed one aggregate table only with "
                    "the same key columns, window and aggregates (name and kind, in order)",
                    hint="make the key_by/window/aggregate calls match, or write to separate "
                    "tables",
                )
        elif kinds != {"append"}:
            other = next((s for s in clash if s.kind != spec.kind), clash[0])
            raise ConfigError(
                f"table {spec.table!r} is the target of {_an(spec.kind)} sink (stream "
                f"{spec.stream!r}) and {_an(other.kind)} sink (stream {other.stream!r}): only "
                "aggregate sinks of the same shape (their deltas merge) or append sinks may "
                "share a table",
                hint="write each to its own table",
            )
        self.sinks.append(spec)

    def __repr__(self) -> str:
        return f"App({self.name!r}, streams={list(self.sources)}, sinks={len(self.sinks)})"


def _aggregate_shape(spec: SinkSpec) -> tuple[Any, ...]:
    """What must match for aggregate sinks to share a table: key columns, window size,
    aggregate columns and kinds."""
    assert spec.key is not None
    window = spec.key.window[0] if spec.key.window is not None else None
    return spec.key.columns, window, tuple((a.name, a.kind) for a in spec.aggregates)


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _show_shape(shape: tuple[Any, ...]) -> str:
    columns, window, aggs = shape
    text = f"key {', '.join(columns)}"
    if window is not None:
        text += f", {window:g}s windows"
    return text + ", " + ", ".join(f"{name}={kind}" for name, kind in aggs)


@dataclass(frozen=True, slots=True)
class Stream:
    """Records of one source after a chain of stateless operators."""

    app: App
    source: str
    steps: tuple[Step, ...]

    def filter(self, fn: Callable[[Any], object]) -> Stream:
        """Keep records where ``fn(record)`` is true."""
        return self._then(Filter(fn))

    def map(self, fn: Callable[[Any], Any]) -> Stream:
        """Transform each record."""
        return self._then(Map(fn))

    def flat_map(self, fn: Callable[[Any], Iterable[Any]]) -> Stream:
        """Turn each record into zero or more records."""
        return self._then(FlatMap(fn))

    def lookup(
        self,
        table: str,
        *,
        on: str | dict[str, str] | tuple[str, str],
        columns: Sequence[str],
        missing: str = "null",
    ) -> Stream:
        """Enrich each record with ``columns`` of the ``table`` row whose key matches.

        ``on`` names the record field that equals the table's key column (``"user_id"``), or
        the field and the column (``{"user_id": "id"}``). The rows are read inside the batch's
        checkpoint transaction with one query per batch: a batch sees the table as of its
        commit (a batch replayed after a crash sees it as of the new attempt). A key without a
        row: ``missing="null"`` sets the columns to None, ``"drop"`` filters the record out,
        ``"dead_letter"`` sets it aside with an error naming the key and the table.
        """
        return self._then(Lookup.build(table, on, columns, missing))

    def key_by(
        self, key: str | Sequence[str] | Callable[[Any], Any], name: str | None = None
    ) -> KeyedStream:
        """Group records by a field (or fields), or by ``fn(record)`` stored in column ``name``."""
        return KeyedStream(self, KeySpec.build(key, name))

    def to_table(self, table: str) -> None:
        """Append one row per record to ``table`` (idempotent on source position)."""
        self.app._add_sink(SinkSpec(self.source, self.steps, "append", table))

    def _then(self, step: Step) -> Stream:
        return Stream(self.app, self.source, (*self.steps, step))


@dataclass(frozen=True, slots=True)
class KeyedStream:
    """A stream grouped by key, ready for ``aggregate`` or ``fold``."""

    stream: Stream
    key: KeySpec

    def aggregate(self, **aggregates: Aggregate) -> AggregatedStream:
        """Per-key aggregates, one sink column each: ``aggregate(n=count(), total=sum("x"))``."""
        if not aggregates:
            raise ConfigError("aggregate() needs at least one aggregate, e.g. n=ps.count()")
        for name, agg in aggregates.items():
            if not isinstance(agg, Aggregate):
                raise ConfigError(f"aggregate {name}= must be ps.count/sum/min/max/avg(...)")
        named = tuple(agg.named(name) for name, agg in aggregates.items())
        return AggregatedStream(self, named)

    def fold(
        self, initial: Any, fn: Callable[[Any, Any], Any], *, name: str | None = None
    ) -> FoldedStream:
        """Per-key state ``fn(state, record) -> state`` starting at ``initial``.

        States are stored as JSON and must come back exactly as returned: plain dicts with str
        keys, lists, str, int, finite float, bool, None (see :mod:`pgstream.operators.fold`).
        """
        return FoldedStream(self, Fold(initial, fn), name)

    def window(self, window: Tumbling, *, time: str | Callable[[Any], Any]) -> KeyedStream:
        """Event-time windows: the key gains a ``window_start timestamptz`` column.

        ``time`` names the record's timestamp field (datetime, ISO string or epoch seconds).
        """
        if not isinstance(window, Tumbling):
            raise ConfigError("window() takes ps.tumbling(seconds=...)")
        return KeyedStream(self.stream, windowed_key(self.key, window, EventClock(time)))


@dataclass(frozen=True, slots=True)
class AggregatedStream:
    """Keyed aggregates, written with ``to_table`` as an upsert sink."""

    keyed: KeyedStream
    aggregates: tuple[Aggregate, ...]

    def to_table(self, table: str) -> None:
        """Merge per-key aggregates into ``table`` (key columns unique)."""
        s = self.keyed.stream
        s.app._add_sink(
            SinkSpec(s.source, s.steps, "aggregate", table, self.keyed.key, self.aggregates)
        )


@dataclass(frozen=True, slots=True)
class FoldedStream:
    """Keyed fold results, written with ``to_table`` as an upsert sink."""

    keyed: KeyedStream
    fold: Fold
    name: str | None

    def to_table(self, table: str) -> None:
        """Overwrite each touched key's row in ``table`` with its state after the batch."""
        s = self.keyed.stream
        _check_fold_partitioning(s, self.keyed.key, table)
        operator_id = self.name or f"{s.source}:fold:{table}"
        s.app._add_sink(
            SinkSpec(
                s.source,
                s.steps,
                "fold",
                table,
                self.keyed.key,
                fold=self.fold,
                operator_id=operator_id,
            )
        )


def _check_fold_partitioning(stream: Stream, key: KeySpec, table: str) -> None:
    """Refuse a fold whose key's records may arrive through several partitions.

    Fold state is kept per source partition: two partitions holding records of one key would
    each fold their own part, and the sink row would hold whichever committed last. A fold is
    correct over a single-partition source, or when the key is the field the source partitions
    by (and only filters run before it, so the field still means what the source split on).
    """
    source = stream.app.sources[stream.source]
    if source.single_partition():
        return
    field = source.partition_key()
    by = key.by
    if (
        field is not None
        and key.window is None
        and by == (field,)
        and all(isinstance(step, Filter) for step in stream.steps)
    ):
        return
    raise ConfigError(
        f"fold into {table!r}: stream {stream.source!r} ({source.describe()}) has several "
        "partitions, and records of one key may arrive through more than one of them, while a "
        "fold's state is kept per partition (each partition would fold its own part of a key)",
        hint=(
            "use aggregate() (its deltas merge across partitions), or key the fold by the field "
            "the source partitions on (TableSource(..., partitions=N, partition_by=...)); a "
            "repartition step for other keys is planned"
        ),
    )

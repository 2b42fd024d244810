"""The public pipeline API: :class:`App`, :class:`Stream` and friends.

Streams are immutable descriptions; nothing runs until ``pgstream run`` (or
:func:`pgstream.runtime.worker.run_app`) compiles the app into per-source pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import psycopg

from pgstream.config import OnError, Settings
from pgstream.errors import ConfigError
from pgstream.expressions import Expr, Select, col
from pgstream.operators.aggregates import Aggregate
from pgstream.operators.fold import Fold
from pgstream.operators.keys import KeySpec
from pgstream.operators.lookup import Lookup, lookups_in
from pgstream.operators.steps import Filter, FlatMap, Map, Step
from pgstream.sources.base import Source
from pgstream.sources.repartition import DEFAULT_PARTITIONS, Repartition, RepartitionSource
from pgstream.sources.table import TableSource

if TYPE_CHECKING:  # windows load when an app asks for one (start-up of apps without them)
    from pgstream.operators.eventtime import TimeUnit
    from pgstream.operators.sessions import Session
    from pgstream.operators.windows import Emit, Hopping, Tumbling, WindowSpec

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
    #: the ``window(...)`` of a windowed aggregate (its key holds ``window_start``)
    window: WindowSpec | None = None
    #: a fold's records handed over through ``pgstream.repartition`` (``stream`` is then the
    #: second stage's stream, ``steps`` empty: they run in the first stage)
    repartition: Repartition | None = None


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
        pushdown: bool | None = None,
        max_retries: int | None = None,
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
            pushdown=pushdown,
            max_retries=max_retries,
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
    window: Any = spec.key.window[0] if spec.key.window is not None else None
    if spec.window is not None and not spec.window.plain:
        # watermarks, lateness and final rows are per stream: such windows are not shared
        window = (window, id(spec))
    return spec.key.columns, window, tuple((a.name, a.kind) for a in spec.aggregates)


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _show_shape(shape: tuple[Any, ...]) -> str:
    columns, window, aggs = shape
    text = f"key {', '.join(columns)}"
    if isinstance(window, tuple):
        text += f", {window[0]:g}s windows with grace, emit or hopping (never shared)"
    elif window is not None:
        text += f", {window:g}s windows"
    return text + ", " + ", ".join(f"{name}={kind}" for name, kind in aggs)


@dataclass(frozen=True, slots=True)
class Stream:
    """Records of one source after a chain of stateless operators."""

    app: App
    source: str
    steps: tuple[Step, ...]

    def filter(self, fn: Callable[[Any], object] | Expr) -> Stream:
        """Keep records where ``fn(record)`` is true, or where a column expression is true
        (``filter(ps.col("amount") > 0)``: NULL drops the record, as in SQL)."""
        if isinstance(fn, Expr):
            return self._then(Filter(fn.compile_predicate(), fn))
        return self._then(Filter(fn))

    def select(self, **columns: Expr | str) -> Stream:
        """Each record becomes a dict of named column expressions:
        ``select(user_id=ps.col("user_id"), cents=ps.col("amount") * 100)`` (a string is a
        column name). Runs in SQL when its sink path can be pushed down."""
        if not columns:
            raise ConfigError("select() needs at least one column, e.g. select(id=ps.col('id'))")
        items: list[tuple[str, Expr]] = []
        for name, value in columns.items():
            if isinstance(value, str):
                value = col(value)
            if not isinstance(value, Expr):
                raise ConfigError(
                    f"select({name}=...) takes a column expression (ps.col, ps.lit, ...), got "
                    f"{type(value).__name__}",
                    hint="use map(fn) for Python functions",
                )
            items.append((name, value))
        spec = Select(tuple(items))
        return self._then(Map(spec.compile(), spec))

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
        self, key: str | Sequence[str] | Callable[[Any], Any] | Expr, name: str | None = None
    ) -> KeyedStream:
        """Group records by a field (or fields), by a column expression, or by
        ``fn(record)``, stored in column ``name``."""
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
    window_spec: WindowSpec | None = None

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
        self,
        initial: Any,
        fn: Callable[[Any, Any], Any],
        *,
        name: str | None = None,
        partitions: int | None = None,
        prune: bool = False,
    ) -> FoldedStream:
        """Per-key state ``fn(state, record) -> state`` starting at ``initial``.

        States are stored as JSON and must come back exactly as returned: plain dicts with str
        keys, lists, str, int, finite float, bool, None (see :mod:`pgstream.operators.fold`).

        Over a source with several partitions whose records of one key may arrive through more
        than one of them, the records go through a repartition (``pgstream.repartition``, see
        :mod:`pgstream.runtime.repartition`) in ``partitions`` partitions (default: the
        source's partition count when it declares one, else 8). ``prune=True`` deletes the
        rows the fold has consumed (``pgstream verify`` then cannot replay the fold over them).
        """
        if partitions is not None and (
            isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1
        ):
            raise ConfigError(f"fold(partitions=...) must be an int >= 1, got {partitions!r}")
        return FoldedStream(self, Fold(initial, fn), name, partitions, prune)

    def window(
        self,
        window: Tumbling | Hopping | Session,
        *,
        time: str | Callable[[Any], Any],
        grace: float | None = None,
        emit: Emit = "update",
        time_unit: TimeUnit = "s",
        idle_timeout: float | None = None,
    ) -> KeyedStream:
        """Event-time windows: the key gains a ``window_start timestamptz`` column.

        ``time`` names the record's timestamp field (datetime, ISO string or epoch seconds;
        epoch milliseconds with ``time_unit="ms"``) or is a function of the record. A record
        whose window ended more than ``grace`` seconds before the partition's watermark goes
        to ``pgstream.late_records``; ``emit="final"`` writes each window's row once, when
        the watermark passes its end + grace (see :mod:`pgstream.operators.windows`).
        ``idle_timeout``: seconds without a commit after which a partition stops holding
        back the job's watermark (``pgstream.job_watermarks``). With ``ps.session(gap=...)``
        ``window_start`` is the session's start and ``grace`` defaults to 0 (see
        :mod:`pgstream.operators.sessions`).
        """
        from pgstream.operators.sessions import Session
        from pgstream.operators.windows import Hopping, Tumbling, windowed_key

        if not isinstance(window, (Tumbling, Hopping, Session)):
            raise ConfigError(
                "window() takes ps.tumbling(seconds=...), ps.hopping(...) or ps.session(gap=...)"
            )
        spec = _window_spec(window, time, grace, emit, time_unit, idle_timeout, self.key)
        key = windowed_key(self.key, window, spec.clock)
        return KeyedStream(self.stream, key, spec)


def _window_spec(
    window: Tumbling | Hopping | Session,
    time: str | Callable[[Any], Any],
    grace: float | None,
    emit: str,
    time_unit: str,
    idle_timeout: float | None,
    key: KeySpec,
) -> WindowSpec:
    """The checked options of a ``window()`` call."""
    from pgstream.operators.eventtime import EventClock
    from pgstream.operators.sessions import Session
    from pgstream.operators.windows import WindowSpec

    if emit not in ("update", "final"):
        raise ConfigError(f"window(emit={emit!r}): emit is 'update' or 'final'")
    if time_unit not in ("s", "ms"):
        raise ConfigError(
            f"window(time_unit={time_unit!r}): time_unit is 's' (epoch seconds) or 'ms'"
        )
    if not (isinstance(time, str) or callable(time)):
        raise ConfigError("window(time=...) takes a field name or a function of the record")
    for name, value in (("grace", grace), ("idle_timeout", idle_timeout)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
        ):
            raise ConfigError(f"window({name}={value!r}) must be a number of seconds >= 0")
    if (emit == "final" or isinstance(window, Session)) and grace is None:
        grace = 0.0
    return WindowSpec(
        window,
        EventClock(time, "ms" if time_unit == "ms" else "s"),
        None if grace is None else float(grace),
        "final" if emit == "final" else "update",
        None if idle_timeout is None else float(idle_timeout),
        key,
    )


@dataclass(frozen=True, slots=True)
class AggregatedStream:
    """Keyed aggregates, written with ``to_table`` as an upsert sink."""

    keyed: KeyedStream
    aggregates: tuple[Aggregate, ...]

    def to_table(self, table: str) -> None:
        """Merge per-key aggregates into ``table`` (key columns unique)."""
        s = self.keyed.stream
        window = self.keyed.window_spec
        if window is not None and window.keeps_state:
            _check_final_partitioning(s, self.keyed.key, table, window)
        s.app._add_sink(
            SinkSpec(
                s.source,
                s.steps,
                "aggregate",
                table,
                self.keyed.key,
                self.aggregates,
                operator_id=f"window:{table}" if window is not None else "",
                window=window,
            )
        )


@dataclass(frozen=True, slots=True)
class FoldedStream:
    """Keyed fold results, written with ``to_table`` as an upsert sink."""

    keyed: KeyedStream
    fold: Fold
    name: str | None
    partitions: int | None = None
    prune: bool = False

    def to_table(self, table: str) -> None:
        """Overwrite each touched key's row in ``table`` with its state after the batch."""
        s = self.keyed.stream
        window = self.keyed.window_spec
        if window is not None and not window.plain:
            raise ConfigError(
                f"fold into {table!r}: a fold after window() takes only tumbling windows "
                "without grace or emit",
                hint="use aggregate() for hopping windows, grace and emit='final'",
            )
        key = self.keyed.key
        operator_id = self.name or f"{s.source}:fold:{table}"
        if not _needs_repartition(s, key, table):
            if self.partitions is not None:
                raise ConfigError(
                    f"fold into {table!r}: partitions={self.partitions} is for a repartition, "
                    f"and stream {s.source!r} needs none (every record of a key arrives "
                    "through one partition)",
                    hint="drop the partitions= argument",
                )
            s.app._add_sink(
                SinkSpec(
                    s.source, s.steps, "fold", table, key, fold=self.fold, operator_id=operator_id
                )
            )
            return
        if lookups_in(s.steps):
            raise ConfigError(
                f"fold into {table!r}: stream {s.source!r} has several partitions, so the fold "
                "goes through a repartition, and a lookup before a repartitioned fold is not "
                "supported yet",
                hint="aggregate() instead of fold(), or key the fold by the source's split column",
            )
        source = s.app.sources[s.source]
        declared = source.n_partitions if isinstance(source, TableSource) else None
        count = self.partitions or declared or DEFAULT_PARTITIONS
        stream = f"{operator_id}:repartition"
        if stream in s.app.sources:
            raise ConfigError(
                f"fold into {table!r}: its repartition stream {stream!r} is declared already",
                hint="give the fold another name= (or rename the stream)",
            )
        rep = Repartition(s.source, s.steps, stream, count, self.prune)
        s.app._add_sink(
            SinkSpec(
                stream, (), "fold", table, key, fold=self.fold, operator_id=operator_id,
                repartition=rep,
            )
        )
        s.app.sources[stream] = RepartitionSource(s.app.name, stream, s.source, count)


def _needs_repartition(stream: Stream, key: KeySpec, table: str) -> bool:
    """Whether a fold's key's records may arrive through several partitions of its source.

    Fold state is kept per partition: two partitions holding records of one key would each
    fold their own part. No repartition is needed over a single-partition source, or when
    the key is the field the source partitions by (and only filters run before it, so the
    field still means what the source split on). A windowed fold over several partitions is
    refused (its window start is not carried through a repartition yet).
    """
    source = stream.app.sources[stream.source]
    if source.single_partition():
        return False
    field = source.partition_key()
    if key.window is not None:
        raise ConfigError(
            f"fold into {table!r}: stream {stream.source!r} ({source.describe()}) has several "
            "partitions and a fold over event-time windows is not repartitioned (its window "
            "start would not follow the key)",
            hint="use aggregate() over the window (its deltas merge across partitions)",
        )
    return not (
        field is not None
        and key.by == (field,)
        and all(isinstance(step, Filter) for step in stream.steps)
    )


def _check_final_partitioning(
    stream: Stream, key: KeySpec, table: str, window: WindowSpec
) -> None:
    """Refuse ``emit="final"`` when one window's records may arrive through several partitions.

    A final row is written once, from the window's state in one partition, when that
    partition's watermark closes the window: correct over a single-partition source, or when
    the key starts with the field the source partitions by (only filters before it).
    """
    source = stream.app.sources[stream.source]
    if source.single_partition():
        return
    field = source.partition_key()
    by = key.by
    if (
        field is not None
        and isinstance(by, tuple)
        and by[:1] == (field,)
        and all(isinstance(step, Filter) for step in stream.steps)
    ):
        return
    from pgstream.operators.sessions import Session

    if isinstance(window.kind, Session):
        raise ConfigError(
            f"session window into {table!r}: stream {stream.source!r} ({source.describe()}) "
            "has several partitions, and records of one key may arrive through more than one "
            "of them, while a key's sessions are kept in one partition's window state (the "
            "partitions would each build their own, overlapping sessions)",
            hint="key by the field the source partitions on "
            "(TableSource(..., partitions=N, partition_by=...)), or use a single-partition "
            "source",
        )
    raise ConfigError(
        f"window into {table!r} with emit='final': stream {stream.source!r} "
        f"({source.describe()}) has several partitions, and records of one key may arrive "
        "through more than one of them, while a final row is written once from one "
        "partition's window state (the other partitions' records would be lost or doubled)",
        hint=(
            "use emit='update' (deltas merge across partitions; readers tell final windows "
            "with pgstream.job_watermarks), or key by the field the source partitions on "
            "(TableSource(..., partitions=N, partition_by=...)); a repartition step for other "
            "keys is planned"
        ),
    )

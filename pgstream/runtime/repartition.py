"""Repartitioning: keyed state that follows its key (Kafka Streams' repartition topics, in
Postgres).

A fold keeps its state per partition of its stream. When records of one key may arrive
through several partitions of the source (a Kafka topic, many files, a table split by another
column), the fold runs in two stages, both ordinary streams of the job (leases, epochs,
ledger, dead letters, shared by a worker group):

1. **Hand-over** (:class:`RepartitionPlan`, a sink plan of the *source's* stream): each record
   runs through the steps before ``key_by``, is keyed, and is written with its key, its JSON
   payload and its upstream position (stream, partition, offset, output number) into
   ``pgstream.repartition``, in repartition partition
   :func:`~pgstream.sources.repartition.partition_of` (CRC-32 of the key's JSON modulo the
   partition count). The rows are written in the source partition's batch transaction, after
   the same compare-and-set as every other effect: exactly once, fenced like the rest (the
   upstream position is also unique in the table).
2. **Fold** (:class:`RepartitionedFoldPlan`, the only sink plan of the repartition stream
   ``<operator>:repartition``): reads the table as a partitioned source
   (:class:`~pgstream.sources.repartition.RepartitionSource`, below the table's safe horizon
   like a table source, since first-stage writers commit out of ``id`` order) and folds each
   record into the state of its repartition partition. All records of a key are in one
   repartition partition, so its state lives in exactly one place.

Cost: one extra row written and read per record. Records cross as JSON (``orjson``): a
datetime reaches the fold as ISO 8601 text, a Decimal or UUID as text. Rows stay in the table
after the fold consumed them unless the fold was declared with ``prune=True``
(:func:`prune`, run by the second stage's owner during maintenance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import psycopg
import psycopg.errors

from pgstream.api import App, SinkSpec
from pgstream.db import queries
from pgstream.operators.keys import KeySpec
from pgstream.operators.steps import compile_chain
from pgstream.runtime.output import BatchOutput
from pgstream.runtime.sinkplans import Expectations, FoldPlan, Overlay, SinkPlan
from pgstream.sinks.append import DuplicateOutputError
from pgstream.sinks.upsert import UpsertSink
from pgstream.sources.repartition import Repartition, partition_of
from pgstream.state.store import KeyedState

__all__ = [
    "RepartitionPlan",
    "RepartitionedFoldPlan",
    "not_folded_yet",
    "plans_for",
    "prune",
    "prune_owned",
]

log = logging.getLogger("pgstream.repartition")

#: a hand-over row before it is written: (rpart, key JSON, payload JSON, offset, output number)
Handed = tuple[int, str, str, int, int]


def _to_json(value: Any) -> bytes:
    """``value`` as JSON; what JSON has no type for (Decimal, UUID...) as its text."""
    return orjson.dumps(value, default=str)


class RepartitionPlan(SinkPlan):
    """First stage: key each record and hand it over to its repartition partition."""

    ORDER = 0
    PER_RECORD = True

    def __init__(self, job: str, spec: SinkSpec) -> None:
        assert spec.repartition is not None and spec.key is not None
        self.rep: Repartition = spec.repartition
        self.job = job
        self.label = f"repartition->{self.rep.stream}"
        self.chain = compile_chain(self.rep.steps)
        self.key_fn: Callable[[Any], Any] = spec.key.fn

    def new_slot(self) -> list[Handed]:
        return []

    def stage(self, value: Any, out: BatchOutput) -> list[tuple[int, str, str]]:
        n = self.rep.partitions
        staged = []
        for o in self.chain(value):
            kj = _to_json(self.key_fn(o))
            staged.append((partition_of(kj, n), kj.decode(), _to_json(o).decode()))
        return staged

    def apply(self, staged: list[tuple[int, str, str]], offset: int, out: BatchOutput) -> None:
        rows: list[Handed] = out.slots[self.slot]
        for seq, (rpart, kj, payload) in enumerate(staged):
            rows.append((rpart, kj, payload, offset, seq))

    @property
    def sink_label(self) -> str:
        return f"pgstream.repartition ({self.rep.stream})"

    def _rows(self, out: BatchOutput) -> list[tuple[Any, ...]]:
        head = (self.job, self.rep.stream)
        tail = (out.source, out.partition)
        return [
            (*head, rpart, kj, payload, *tail, offset, seq)
            for rpart, kj, payload, offset, seq in out.slots[self.slot]
        ]

    def write_sink(
        self, cur: psycopg.Cursor[Any], out: BatchOutput, tolerate_duplicates: bool
    ) -> int:
        """COPY the batch's hand-over rows; after rewound offsets, insert ignoring the
        positions handed over already."""
        rows = self._rows(out)
        if not rows:
            return 0
        if tolerate_duplicates:
            cur.executemany(queries.INSERT_REPARTITION_IGNORING_DUPLICATES, rows)
            return len(rows)
        try:
            with cur.copy(queries.COPY_REPARTITION) as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation as exc:
            raise DuplicateOutputError(str(exc)) from exc
        return len(rows)

    def expect(self, out: BatchOutput, partition: str, expected: Expectations) -> None:
        """Each hand-over row at its upstream position."""
        bucket = expected.handed_over[(self.rep.stream, out.source)]
        for rpart, kj, payload, offset, seq in out.slots[self.slot]:
            bucket[(partition, offset, seq)] = (rpart, kj, orjson.loads(payload))


class RepartitionedFoldPlan(FoldPlan):
    """Second stage: a fold over ``{"key": ..., "payload": ...}`` records of one repartition
    partition, keyed by the key the first stage computed."""

    def __init__(self, spec: SinkSpec, sink: UpsertSink, state: KeyedState) -> None:
        super().__init__(spec, sink, state)
        assert spec.key is not None
        self.key_spec: KeySpec = spec.key
        self.label = f"fold->{spec.table} (repartitioned)"

    def stage(self, value: Any, out: BatchOutput) -> Overlay:
        key = value["key"]
        if len(self.key_spec.columns) > 1:
            key = tuple(key)
        record = value["payload"]
        kj = orjson.dumps(key).decode()
        pending = out.pending[self.slot] if out.pending else {}
        hit = out.slots[self.slot].get(kj) or pending.get(kj)
        blob = hit[1] if hit is not None else self.state.values.get(kj)
        return {kj: (key, self.fold.step(blob, record, key))}


def plans_for(
    app: App,
    source: str,
    sinks: dict[str, Any],
    states: dict[str, KeyedState],
) -> list[SinkPlan]:
    """The repartition plans of ``source``'s pipeline: hand-overs of the folds it feeds
    (first stage) and the fold of a repartition stream (second stage)."""
    found: list[SinkPlan] = []
    for spec in app.sinks:
        rep = spec.repartition
        if rep is None:
            continue
        if rep.upstream == source:
            found.append(RepartitionPlan(app.name, spec))
        if spec.stream == source:
            sink = sinks[spec.table]
            assert isinstance(sink, UpsertSink)
            found.append(RepartitionedFoldPlan(spec, sink, states[spec.operator_id]))
    return found


def prune(conn: psycopg.Connection[Any], job: str, stream: str, partition: str) -> int:
    """Delete the rows of one repartition partition that its fold has consumed (below its
    committed offset); returns how many. Nothing is lost for the running job (its fold
    never reads below its committed offset again), but ``pgstream verify`` can then no longer
    replay the fold over the pruned range, and a rewind of the repartition stream cannot
    read it again."""
    with conn.cursor() as cur:
        cur.execute(
            queries.PRUNE_REPARTITION, {"job": job, "stream": stream, "partition": partition}
        )
        return cur.rowcount


def prune_owned(
    conn: psycopg.Connection[Any], app: App, owned: Iterable[tuple[str, str]]
) -> int:
    """:func:`prune` every owned partition of the repartitions declared with
    ``prune=True`` (run by the worker during maintenance); returns the rows deleted."""
    pruning = {s.repartition.stream for s in app.sinks if s.repartition and s.repartition.prune}
    deleted = 0
    for stream, partition in owned:
        if stream in pruning:
            deleted += prune(conn, app.name, stream, partition)
    if deleted:
        log.debug("pruned %d consumed repartition rows", deleted)
    return deleted


def not_folded_yet(
    conn: psycopg.Connection[Any], app: App, positions: Iterable[tuple[str, str, int]]
) -> bool:
    """Whether an owned repartition partition (``(stream, partition, position)``) holds
    committed rows its fold has not read yet: such a partition is not idle even when its last
    read returned nothing (the rows wait for the safe horizon), so ``run --stop-when-idle``
    does not stop before folding what its own first stage handed over."""
    streams = {s.repartition.stream for s in app.sinks if s.repartition is not None}
    for stream, partition, position in positions:
        if stream not in streams:
            continue
        params = {"job": app.name, "stream": stream, "rpart": int(partition), "position": position}
        row = conn.execute(queries.REPARTITION_PENDING, params).fetchone()
        if row is not None and row[0]:
            return True
    return False

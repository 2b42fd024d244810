"""The swap: ONE transaction that puts a caught-up shadow job in the live job's place.

1. **Lock** the job (against a concurrent ``--accept-changes``) and check that today's plan
   is still the job's; lock the live partition rows of the rebuilt streams ``FOR UPDATE``
   (a batch in flight holds its row until its COMMIT: waited for up to ``--wait`` seconds),
   then the shadow's.
2. **Finish the gap**: a shadow partition still behind the live committed offset gets one
   more batch, written by the batch code (:func:`~pgstream.runtime.checkpoint.write_batch`)
   in this transaction; now every shadow offset equals the live one.
3. **Check** (streams rebuilt in part, ``--sink``): the shadow has no dead letter the live
   job lacks (such a record would have its effect nowhere).
4. **Swap the tables**: live ``T`` becomes ``T__old``, the shadow becomes ``T``; ``T__old``
   is dropped unless ``--keep-old``.
5. **Move the checkpoint**: state, late records and watermark entries of the rebuilt
   operators; for fully rebuilt streams the ledger (under the live plan version), skipped
   ranges, dead letters and counters. Every live row of the rebuilt streams is *fenced*
   (new epoch, no lease): a live worker's next compare-and-set fails and it claims the row
   again, reloading the moved state (workers keep state in memory, so this is needed even
   though no offset moves).
6. **Drop** the shadow job's rows, then ``COMMIT``. A crash before it changes nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql

from pgstream.admin import Outcome
from pgstream.api import App
from pgstream.db import queries
from pgstream.errors import ConfigError, JobStateError
from pgstream.rebuild.catchup import BoundedReader
from pgstream.rebuild.shadow import (
    Shadow,
    TablePair,
    check_live_plan,
    check_old_table,
    drop_shadow_job,
)
from pgstream.runtime.checkpoint import BatchRange, SinkDataError, write_batch
from pgstream.runtime.crashpoints import crash_point
from pgstream.runtime.pipeline import BatchOutput, Pipeline, new_states
from pgstream.runtime.worker import build_sinks
from pgstream.sources.base import OpenContext, SourceError

Cursor = psycopg.Cursor[Any]

#: seconds the swap waits for a batch in flight to release a partition row
LOCK_WAIT_SECONDS = 10.0
#: records read at a time while finishing the gap
CHUNK = 2000

ShadowRow = tuple[int | None, int]  # (committed offset, epoch)


class Swapper:
    """Swaps a caught-up shadow job in (see the module docstring)."""

    def __init__(
        self,
        shadow: Shadow,
        conn: psycopg.Connection[Any],
        dsn: str,
        *,
        lock_wait: float = LOCK_WAIT_SECONDS,
        keep_old: bool = False,
        target: str = "MODULE:APP",
    ) -> None:
        self.shadow = shadow
        self.conn = conn
        self.dsn = dsn
        self.lock_wait = lock_wait
        self.keep_old = keep_old
        self.target = target
        self.worker = f"rebuild:{socket.gethostname()}:{os.getpid()}"

    @property
    def _app(self) -> App:
        return self.shadow.selection.app

    def params(self, **more: Any) -> dict[str, Any]:
        """The parameters of the ``queries.REBUILD_*`` statements."""
        sel = self.shadow.selection
        return {
            "job": sel.app.name,
            "shadow": self.shadow.job,
            "streams": list(sel.streams),
            "operators": list(sel.operators),
            **more,
        }

    def run(self) -> Outcome:
        """Swap in one transaction; the outcome lines say what moved."""
        try:
            return self._run()
        except psycopg.errors.LockNotAvailable:
            raise JobStateError(
                f"a transaction held a partition row or a sink table of job "
                f"{self._app.name!r} for more than {self.lock_wait:g}s (a batch in flight, a "
                "long query on a sink table, a job command): nothing was swapped",
                hint="run the rebuild again (it resumes; --wait SECONDS waits longer)",
            ) from None

    def _run(self) -> Outcome:
        outcome = Outcome()
        sel = self.shadow.selection
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(queries.LOCK_JOB, {"job": sel.app.name})
            cur.execute(queries.LOCK_JOB, {"job": self.shadow.job})
            version = check_live_plan(self.conn, sel.app, self.target)
            live, held = self._lock(cur)
            mine = self._lock_shadow(cur)
            finished = self._finish_gaps(cur, live, mine)
            crash_point("rebuild_after_gap")
            self._check_dead_letters(cur)
            for table, pair in self.shadow.pairs.items():
                self._swap_table(cur, pair, table, outcome)
            for stmt in queries.REBUILD_MOVE_OPERATORS:
                cur.execute(stmt, self.params())
            full = list(sel.full_streams)
            if full:
                for stmt in queries.REBUILD_MOVE_STREAMS:
                    cur.execute(stmt, self.params(streams=full, version=version))
            cur.execute(queries.REBUILD_FENCE, self.params())
            for table in sel.tables:
                cur.execute(
                    queries.REBUILD_RECORD, {"job": sel.app.name, "sink": table, "version": version}
                )
            drop_shadow_job(self.conn, self.shadow.job)
            crash_point("rebuild_before_commit")
        outcome.add(
            f"offsets, state and watermarks of stream(s) {', '.join(sel.streams)} moved to job "
            f"{sel.app.name!r} ({len(live)} partition(s); {finished} finished in the swap)"
        )
        if full:
            outcome.add(
                f"ledger, dead letters and counters of {', '.join(full)} replaced by the "
                f"rebuild's (plan version {version})"
            )
        if held:
            outcome.add(f"{held} partition(s) leased by a live worker: fenced, they resume now")
        return outcome

    def _lock(self, cur: Cursor) -> tuple[dict[tuple[str, str], int], int]:
        """Lock the live rows: committed offsets by partition, and how many a worker holds.
        The lock timeout holds for the rest of the transaction (the table swap too)."""
        cur.execute(queries.SET_LOCK_TIMEOUT, {"ms": str(max(1, int(self.lock_wait * 1000)))})
        rows = cur.execute(queries.REBUILD_LOCK_PARTITIONS, self.params()).fetchall()
        live = {(r[0], r[1]): int(r[2]) for r in rows if r[2] is not None}
        return live, sum(1 for r in rows if r[5])

    def _lock_shadow(self, cur: Cursor) -> dict[tuple[str, str], ShadowRow]:
        """Register the shadow's missing rows (a partition that appeared since the catch-up),
        then lock them all."""
        for name in self.shadow.app.sources:
            rows = cur.execute(queries.REBUILD_OFFSETS, self.params(streams=[name])).fetchall()
            cur.execute(
                queries.REGISTER_PARTITIONS,
                {"job": self.shadow.job, "source": name, "partitions": [r[1] for r in rows]},
            )
        rows = cur.execute(
            queries.REBUILD_LOCK_PARTITIONS, self.params(job=self.shadow.job)
        ).fetchall()
        return {(r[0], r[1]): (None if r[2] is None else int(r[2]), int(r[3])) for r in rows}

    def _finish_gaps(
        self,
        cur: Cursor,
        live: dict[tuple[str, str], int],
        mine: dict[tuple[str, str], ShadowRow],
    ) -> int:
        """Bring every shadow partition to the live offset; return how many needed it."""
        version = self.shadow.recorded(self.conn)
        finished = 0
        for key, bound in live.items():
            committed, epoch = mine[key]
            first = self.shadow.app.sources[key[0]].initial_offset(key[1])
            start = first if committed is None else committed
            if start > bound:
                raise JobStateError(
                    f"the rebuild of {key[0]}/{key[1]} is at offset {start}, beyond the live "
                    f"job's {bound} (was the job rewound or reset since the rebuild started?)",
                    hint="start the rebuild over with --restart",
                )
            if start == bound:
                continue
            if version is None:
                raise JobStateError("the shadow job has no recorded plan: run rebuild again")
            self._finish_gap(cur, key, (committed, epoch), start, bound, version[0])
            finished += 1
        return finished

    def _finish_gap(
        self,
        cur: Cursor,
        key: tuple[str, str],
        row: ShadowRow,
        start: int,
        bound: int,
        version: int,
    ) -> None:
        """One shadow batch ``[start, bound)`` written in this transaction."""
        stream, partition = key
        app = self.shadow.app
        states = new_states(app, stream, partition)
        for state in states.values():
            state.load(self.conn)
        sinks = build_sinks(app)
        for sink in sinks.values():
            sink.bind(self.conn)
        pipeline = Pipeline(app, stream, partition, sinks, states)
        source = app.sources[stream]
        try:
            reader = BoundedReader(
                source.open(partition, OpenContext(self.dsn, pipeline.fields)), bound
            )
        except SourceError as exc:
            raise JobStateError(f"{source.describe()} cannot be opened: {exc}") from exc
        try:
            out = self._evaluate(pipeline, reader, start, bound)
            rng = BatchRange(
                job=self.shadow.job,
                source=stream,
                partition=partition,
                epoch=row[1],
                worker=self.worker,
                committed=row[0],
                start=start,
                end=bound,
                head=bound,
                plan_version=version,
                skips=tuple(reader.skips(start, bound)),
                instance=reader.instance(),
            )
            try:
                write_batch(cur, pipeline, rng, out, lease_seconds=0)
            except SinkDataError as exc:
                raise JobStateError(
                    f"sink {exc.table} rejected a row of {stream}/{partition} while the swap "
                    f"finished the rebuild's last offsets [{start}, {bound}): {exc}; nothing "
                    "was swapped",
                    hint="run the rebuild again: its catch-up sets rejected records aside as "
                    "dead letters",
                ) from exc
        finally:
            reader.close()

    def _evaluate(
        self, pipeline: Pipeline, reader: BoundedReader, start: int, bound: int
    ) -> BatchOutput:
        out: BatchOutput | None = None
        pos = start
        while pos < bound:
            res = reader.read(pos, CHUNK)
            if res.end <= pos:
                raise JobStateError(
                    f"the rebuild could not read offsets [{pos}, {bound}) of "
                    f"{pipeline.source}/{pipeline.partition}, which the live job committed: "
                    "nothing was swapped",
                    hint="run the rebuild again",
                )
            out = pipeline.evaluate(res.records, None, out)
            pos = res.end
        return out if out is not None else pipeline.evaluate([])

    def _check_dead_letters(self, cur: Cursor) -> None:
        partial = list(self.shadow.selection.partial_streams)
        if not partial:
            return
        rows = cur.execute(queries.REBUILD_NEW_DEAD_LETTERS, self.params(streams=partial))
        found = rows.fetchall()
        if found:
            listed = "; ".join(f"{s}/{p} offset {o}: {e.splitlines()[0]}" for s, p, o, e in found)
            raise JobStateError(
                f"records that the live job processed fail in the rebuilt sinks' operators, "
                f"so the rebuilt tables would miss them: {listed}; nothing was swapped",
                hint="fix the operator (record it with `pgstream run MODULE:APP "
                "--accept-changes`) and rebuild again with --restart, or rebuild every sink of "
                "the stream with --restart (the replay's dead letters then replace the live "
                "ones)",
            )

    def _swap_table(self, cur: Cursor, pair: TablePair, table: str, outcome: Outcome) -> None:
        """Live ``T`` becomes ``T__old`` (dropped unless --keep-old), the shadow becomes ``T``."""
        old = sql.Identifier(pair.live.schema, pair.old_name)
        check_old_table(self.conn, pair, table)
        rename = queries.REBUILD_RENAME_TABLE
        cur.execute(rename.format(pair.live.ident, sql.Identifier(pair.old_name)))
        cur.execute(rename.format(pair.shadow_ident, sql.Identifier(pair.live.name)))
        if self.keep_old:
            outcome.add(f"{table}: swapped in; the old table is kept as {pair.old_name}")
            return
        try:
            cur.execute(queries.REBUILD_DROP_TABLE_STRICT.format(old))
        except psycopg.errors.DependentObjectsStillExist as exc:
            raise ConfigError(
                f"the old table {table} cannot be dropped: {str(exc).strip().splitlines()[0]} "
                "(a view or a foreign key refers to it); nothing was swapped",
                hint="rebuild with --keep-old (the old table stays as "
                f"{pair.old_name}; views keep reading it: they bind to the table, not its "
                "name), then recreate the views on the new table",
            ) from None
        outcome.add(f"{table}: swapped in (the old table is dropped)")

"""``pgstream verify``: audit a job's exactly-once invariants against its own sources.

What is checked, per (source, partition) of the job:

1. **Ledger.** ``pgstream.batches`` tiles ``[initial offset, committed_offset)`` with no gap
   and no overlap, and its last batch ends exactly at ``partitions.committed_offset``
   (kinds ``ledger-gap`` / ``ledger-overlap``). Each batch's ``records_in`` equals the
   number of records the source holds in its range (more: the runtime skipped records,
   ``lost``; fewer: the source no longer holds the range, so it cannot be checked).
2. **One effect per record.** The source is re-read over the committed range and every
   ledger batch is re-evaluated through the app's own operators
   (:meth:`pgstream.runtime.pipeline.Pipeline.evaluate`, folds replayed from empty state).
   The result must be exactly the rows in each append sink, compared on
   ``(_source, _partition, _offset, _seq)`` and values, plus the dead letters, each once.
   Dead letters written by the runtime itself (a record the sink rejected, or one that
   kept killing the worker) stand for their record.
3. **Nothing above the committed offset.** No append row or dead letter has an offset at
   or above its partition's committed offset.
4. **Keyed results.** Keyed aggregates equal a recomputation from the source; fold sinks
   and ``pgstream.state`` equal a replay of the folds (numbers compared with a tolerance).

Each batch is judged by the plan it ran under (``batches.plan_version``, see
:mod:`pgstream.plan`). A sink that batch's plan did not have expects nothing from it (a sink
added later holds only the effects of later batches, aggregates included). A sink whose
plan entry differs from the app's (changed code, key, aggregates) cannot be checked over
that batch: an append sink's rows in its range are skipped, a keyed sink is not checked at
all (its rows mix both plans), and the report lists every such range as "not checked"
(``unchecked``) instead of reporting violations. So do batches from before the job's plan
was recorded.

Ranges a broker no longer holds (``PartitionReader.retained_from``: retention, trimming)
cannot be re-read: they are listed as not checked, with the stream's keyed sinks.
Ranges a broker source's reset policy skipped (``on_lost``, ``pgstream.skipped_ranges``) are
listed as "skipped by policy" (``skipped``), never as ``lost``: the ledger batch that covers
one counts only the records the source still holds, which is what re-reading finds.

Violations have a kind: ``lost``, ``duplicated``, ``unexpected``, ``wrong-value``,
``ledger-gap`` or ``ledger-overlap``. All database reads run in one REPEATABLE READ
snapshot, so a live job can be verified while it runs.

Exit codes of the command: 0 clean, 1 violations, 2 cannot check (the reason is printed).

The package's rooms: :mod:`~pgstream.verify.audit` (one job's audit, :func:`verify_app`),
:mod:`~pgstream.verify.ledger` (the committed checkpoint and the ledger's tiling),
:mod:`~pgstream.verify.reread` (re-reading the sources, replaying the operators),
:mod:`~pgstream.verify.judge` (which plan version a batch ran under),
:mod:`~pgstream.verify.compare` (stored rows against the expectations, per sink kind),
:mod:`~pgstream.verify.values` (tolerant value comparison) and
:mod:`~pgstream.verify.report` (the report). What a sink must hold comes from the sink plans
themselves (:meth:`SinkPlan.expect <pgstream.runtime.sinkplans.SinkPlan.expect>`).
"""

from __future__ import annotations

from pgstream.verify.audit import verify_app
from pgstream.verify.report import KINDS, CannotVerify, VerifyReport, Violation
from pgstream.verify.values import values_equal

__all__ = [
    "KINDS",
    "CannotVerify",
    "VerifyReport",
    "Violation",
    "values_equal",
    "verify_app",
]

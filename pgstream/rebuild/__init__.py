"""``pgstream rebuild``: replay a job (or some of its sinks) from the start into shadow
tables while the live job keeps serving the old ones, then swap them in atomically with the
offsets and the state.

Three steps, each in its own module:

1. :mod:`~pgstream.rebuild.shadow`: which sinks and streams are rebuilt (the
   :class:`Selection`), the *shadow job* ``<job>~rebuild`` (a derived app writing to shadow
   tables created ``LIKE`` the live ones) and the refusals;
2. :mod:`~pgstream.rebuild.catchup`: the shadow job runs with the ordinary worker (its own
   partition rows, ledger, state and dead letters: every batch is an ordinary checkpoint),
   each partition's reads bounded by the live job's committed offset; rounds repeat until
   the gap is small. Killed, it resumes from its checkpoints;
3. :mod:`~pgstream.rebuild.swap`: ONE transaction fences the live partitions, finishes the
   gap with the batch code, swaps the tables, moves the shadow's checkpoint data to the live
   job and drops the shadow job. A crash before its COMMIT changes nothing.
"""

from __future__ import annotations

from pgstream.rebuild.catchup import BoundedReader, CatchUp, CatchUpProgress
from pgstream.rebuild.shadow import Selection, Shadow, select
from pgstream.rebuild.swap import Swapper

__all__ = [
    "BoundedReader",
    "CatchUp",
    "CatchUpProgress",
    "Selection",
    "Shadow",
    "Swapper",
    "select",
]

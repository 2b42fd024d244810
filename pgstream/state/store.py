"""Keyed operator state held in memory while a worker owns the partition.

The committed state of a (fold operator, partition) is loaded in full when the lease is
taken, changed only through per-batch overlays, and written back (touched keys only) inside
the batch transaction. An overlay is merged into memory only after its batch commits, so a
rolled-back batch leaves no trace.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgstream.db import queries


class KeyedState:
    """Committed state of one fold operator for one partition: JSON key -> JSON bytes."""

    def __init__(self, job: str, operator: str, partition: str) -> None:
        self.job = job
        self.operator = operator
        self.partition = partition
        self.values: dict[str, bytes] = {}

    def load(self, conn: psycopg.Connection[Any]) -> None:
        """Replace the in-memory state with what is committed (on takeover)."""
        params = {"job": self.job, "operator": self.operator, "partition": self.partition}
        with conn.cursor() as cur:
            rows = cur.execute(queries.LOAD_STATE, params).fetchall()
        self.values = {k: v.encode() for k, v in rows}

    def write(self, cur: psycopg.Cursor[Any], overlay: dict[str, bytes]) -> None:
        """Upsert the keys an uncommitted batch touched (inside its transaction)."""
        if not overlay:
            return
        cur.execute(queries.STAGE_STATE)
        with cur.copy(queries.COPY_STATE_STAGE) as copy:
            for key, blob in overlay.items():
                copy.write_row((key, blob.decode()))
        cur.execute(
            queries.UPSERT_STATE,
            {"job": self.job, "operator": self.operator, "partition": self.partition},
        )

    def merge(self, overlay: dict[str, bytes]) -> None:
        """Adopt a committed batch's changes."""
        self.values.update(overlay)

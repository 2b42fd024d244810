"""A window operator's committed state for one partition: its watermark and open windows.

The watermark (epoch seconds, ``None`` before the operator accepted its first record) lives
in the partition row (``pgstream.partitions.watermarks``, one entry per window operator), so
it commits with the batch that advanced it, under the batch's fence, and is reloaded with the
lease on takeover. With ``emit="final"`` the accumulators of the windows still open live in
``pgstream.state`` (key: the JSON of ``[key, window start]``), like a fold's state: touched
windows are upserted, emitted windows deleted, in the batch transaction.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgstream.db import queries
from pgstream.state.store import KeyedState


class WindowState(KeyedState):
    """Committed watermark and (final mode) open-window accumulators of one window operator
    for one partition."""

    def __init__(self, job: str, operator: str, partition: str, source: str) -> None:
        super().__init__(job, operator, partition)
        self.source = source
        self.watermark: float | None = None

    def load(self, conn: psycopg.Connection[Any]) -> None:
        """Reload the committed watermark and open windows (on takeover)."""
        super().load(conn)
        params = {
            "job": self.job,
            "source": self.source,
            "partition": self.partition,
            "operator": self.operator,
        }
        with conn.cursor() as cur:
            row = cur.execute(queries.LOAD_WATERMARK, params).fetchone()
        self.watermark = None if row is None or row[0] is None else float(row[0])

    def write_watermark(self, cur: psycopg.Cursor[Any], watermark: float | None) -> None:
        """Store the partition's new watermark for this operator (inside the batch)."""
        if watermark is None or watermark == self.watermark:
            return
        cur.execute(
            queries.SAVE_WATERMARK,
            {
                "job": self.job,
                "source": self.source,
                "partition": self.partition,
                "marks": Jsonb({self.operator: watermark}),
            },
        )

    def delete(self, cur: psycopg.Cursor[Any], keys: list[str]) -> None:
        """Delete emitted windows' state (inside the batch)."""
        if keys:
            cur.execute(
                queries.DELETE_STATE_KEYS,
                {
                    "job": self.job,
                    "operator": self.operator,
                    "partition": self.partition,
                    "keys": keys,
                },
            )

"""The plan-version judge: which sinks each ledger batch can be checked for.

Each batch is judged by the plan it ran under (``batches.plan_version``, see
:mod:`pgstream.plan`) against the app's plan.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from typing import Any

import psycopg

from pgstream import plan as plans
from pgstream.api import App
from pgstream.db import queries
from pgstream.operators.lookup import lookups_in
from pgstream.verify.expected import Expected
from pgstream.verify.ledger import Partition


class PlanJudge:
    """Which sinks each plan version's batches can be checked for, against the app's plan.

    A status per sink index of ``app.sinks``: ``same`` (check), ``absent`` (the sink did not
    exist: expect nothing) or ``changed`` (cannot check). Version 0 marks ranges that are no
    ledger batch (gaps, themselves violations): judged by the app's plan.
    """

    def __init__(
        self,
        app: App,
        versions: dict[int, tuple[plans.Plan, str | None]],
        rebuilds: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.plan = plans.describe(app)
        self.sids = list(plans.sink_entries(self.plan))
        self.versions = versions
        #: sink table -> the plan version ``pgstream rebuild`` wrote all its rows with
        self.rebuilds = rebuilds or {}
        self._status: dict[int | None, list[str]] = {}
        # (table, source, partition, version) -> merged unchecked ranges
        self.ranges: dict[tuple[str, str, str, int | None], list[list[int]]] = defaultdict(list)

    def status(self, version: int | None) -> list[str]:
        """The status of every sink of the app for batches of ``version``: a sink whose table
        was rebuilt at a later version is judged by that version (its rows come from it)."""
        found = list(self._plain_status(version))
        for i, spec in enumerate(self.app.sinks):
            rebuilt = self.rebuilds.get(spec.table)
            if rebuilt is not None and version != 0 and (version is None or version < rebuilt):
                found[i] = self._plain_status(rebuilt)[i]
        return found

    def _plain_status(self, version: int | None) -> list[str]:
        if version not in self._status:
            if version == 0:
                found = ["same"] * len(self.sids)
            elif version is None or version not in self.versions:
                found = ["changed"] * len(self.sids)
            else:
                by_sid = plans.sink_status(self.versions[version][0], self.plan)
                found = [by_sid[sid] for sid in self.sids]
            for i, spec in enumerate(self.app.sinks):
                if found[i] == "same" and lookups_in(spec.steps):
                    found[i] = "changed"  # see reason(): values from a lookup table
            self._status[version] = found
        return self._status[version]

    def reason(self, version: int | None, table: str) -> str:
        """Why batches of ``version`` cannot be checked for ``table``."""
        looked = [
            lk.table for s in self.app.sinks if s.table == table for lk in lookups_in(s.steps)
        ]
        if looked:
            return (
                f"is enriched by lookup({', '.join(map(repr, sorted(set(looked))))}): each batch "
                "read that table as of its own commit, which verify cannot re-read, so its rows "
                "and the records the lookup dropped or dead-lettered are not checked"
            )
        if version is None or version not in self.versions:
            return "ran before the job's plan was recorded (the plan it ran under is unknown)"
        changes = plans.diff(self.versions[version][0], self.plan)
        mine = [c.what for c in changes if c.table == table] or [c.what for c in changes]
        return f"ran under plan version {version} (changes: {'; '.join(mine)})"

    def skip(
        self, indices: list[int], version: int | None, p: Partition, start: int, end: int,
        expected: Expected,
    ) -> None:
        """Record that sinks ``indices`` cannot be checked over ``[start, end)``."""
        for i in indices:
            spec = self.app.sinks[i]
            if spec.kind != "append":
                expected.unchecked_tables.setdefault(
                    spec.table,
                    f"{spec.table}: {self.reason(version, spec.table)}; its rows mix results of "
                    "the old and the new plan, so verify cannot check this table",
                )
                continue
            _add_range(expected.skip_append[spec.table][(p.source, p.partition)], start, end)
            ranges = self.ranges[(spec.table, p.source, p.partition, version)]
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = end
            else:
                ranges.append([start, end])

    def notes(self, expected: Expected) -> list[str]:
        """One line per unchecked range or table."""
        out = [
            f"{table} {source}/{partition} [{a}, {b}): {self.reason(version, table)}"
            for (table, source, partition, version), ranges in self.ranges.items()
            for a, b in ranges
        ]
        return out + sorted(expected.unchecked_tables.values())


def _add_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    """Append ``[start, end)`` to sorted, disjoint ``ranges``, merging it with the last."""
    if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], end)
    else:
        ranges.append((start, end))


def in_ranges(ranges: list[tuple[int, int]] | None, offset: int) -> bool:
    if not ranges:
        return False
    i = bisect.bisect_right(ranges, (offset, math.inf)) - 1
    return i >= 0 and ranges[i][0] <= offset < ranges[i][1]


def load_judge(conn: psycopg.Connection[Any], app: App) -> PlanJudge:
    versions = {
        int(v): (plan, changes)
        for v, plan, changes in conn.execute(queries.PLAN_VERSIONS, {"job": app.name})
    }
    rebuilds = {
        str(sink): int(v) for sink, v in conn.execute(queries.VERIFY_REBUILDS, {"job": app.name})
    }
    return PlanJudge(app, versions, rebuilds)

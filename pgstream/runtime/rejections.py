"""Telling a bad record from a sink that rejects every record.

When the database rejects a batch's sink rows, the batch is bisected down to the bad record,
which is dead-lettered. If the sink table does not fit what the pipeline writes (a text value
into a bigint column, a NOT NULL column the map never fills), *every* record is bad, and
bisection would turn the whole stream into one-record batches and dead letters. So before
bisecting, the task tries the batch's first ``max_sink_rejections`` records alone (in
transactions that are rolled back): when each is rejected for the same :class:`Reason`, it
stops with :func:`rejects_everything` instead, and nothing of the batch is committed.
A batch of a single record has nothing after it to compare with; there the task counts such
rejections in a row across batches instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgstream.errors import SinkRejectedError
from pgstream.runtime.checkpoint import SinkDataError

_QUOTED = re.compile(r'"[^"]*"')
_COPY_COLUMN = re.compile(r", column ([^:]+):")


@dataclass(frozen=True, slots=True)
class Reason:
    """Why the database rejected a row, without the row's values: two rejections with
    equal reasons failed the same way (same SQLSTATE, table, column, constraint, type)."""

    sqlstate: str
    table: str
    column: str | None
    constraint: str | None
    datatype: str | None
    message: str  # the primary message with quoted values (and names) blanked

    @classmethod
    def of(cls, exc: SinkDataError) -> Reason:
        """The reason of a sink rejection."""
        diag = exc.cause.diag
        primary = diag.message_primary or str(exc.cause)
        return cls(
            sqlstate=exc.cause.sqlstate or "",
            table=exc.table,
            column=_column(exc),
            constraint=diag.constraint_name,
            datatype=diag.datatype_name,
            message=_QUOTED.sub('"?"', primary),
        )


def _column(exc: SinkDataError) -> str | None:
    """The column the database names, in its diagnostics or in a ``COPY`` context line."""
    diag = exc.cause.diag
    if diag.column_name:
        return diag.column_name
    found = _COPY_COLUMN.search(diag.context or "")
    return found.group(1).strip() if found else None


def _fix(reason: Reason) -> str:
    """What to change, by the kind of rejection."""
    column = f"column {reason.column}" if reason.column else "the column"
    code = reason.sqlstate
    if code == "23502":
        return (
            f"the pipeline writes no value (or null) for NOT NULL {column}: set it in your "
            "map, or give the column a DEFAULT (or drop NOT NULL) in a migration"
        )
    if code.startswith("22") or code == "42804":
        return (
            f"the values the pipeline writes for {column} do not fit its type: convert them "
            "in your map (e.g. int(...) for a bigint column; a numeric source column gives "
            "Decimals) or change the column's type in a migration"
        )
    if code == "23514":
        return (
            f"the rows violate CHECK constraint {reason.constraint}: fix the map or the "
            "constraint"
        )
    if code == "23503":
        return (
            f"the rows reference rows that do not exist (foreign key {reason.constraint}): "
            "load the referenced rows first or drop the constraint"
        )
    return "make the sink table accept what the pipeline writes (a migration) or fix the map"


def rejects_everything(
    exc: SinkDataError, probed: int, where: str, start: int, dead_lettered: int = 0
) -> SinkRejectedError:
    """The error for a sink that rejected ``probed`` records in a row of ``where``
    (``source/partition``), each alone, for the reason of ``exc``: from offset ``start`` on,
    or up to the one at ``start`` when the ``dead_lettered`` before it were set aside."""
    reason = Reason.of(exc)
    diag = exc.cause.diag
    details = [f"SQLSTATE {reason.sqlstate}"]
    if reason.column:
        details.append(f"column {reason.column}")
    if reason.constraint:
        details.append(f"constraint {reason.constraint}")
    first = diag.message_primary or str(exc.cause).strip().splitlines()[0]
    span = f"up to offset {start}" if dead_lettered else f"from offset {start}"
    kept = (
        f"the {dead_lettered} before it are in pgstream.dead_letters; " if dead_lettered else ""
    )
    return SinkRejectedError(
        f"sink table {exc.table} rejects every record of {where}: {probed} records in a row "
        f"{span}, each written alone, were rejected for the same reason: {first} "
        f"({', '.join(details)}); {kept}nothing from that offset on was committed",
        hint=(
            f"{_fix(reason)}; then run again (it resumes at offset {start}). To dead-letter "
            "such records one by one instead, set App(..., max_sink_rejections=0)"
        ),
    )

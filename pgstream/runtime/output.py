"""What evaluating a batch produces before it is written: one slot per sink plan, dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class DeadLetter:
    """A record that could not be decoded or processed."""

    offset: int
    payload: bytes | None
    error: str
    operator: str


@dataclass(slots=True)
class BatchOutput:
    """Everything one batch will write, before it is written.

    ``slots`` holds one entry per sink plan of the pipeline, in the pipeline's plan order: each
    plan creates, fills and writes its own (:class:`~pgstream.runtime.sinkplans.SinkPlan`) and
    no one else looks inside.
    """

    source: str
    partition: str
    slots: list[Any]
    dead: list[DeadLetter] = field(default_factory=list)
    records_in: int = 0
    #: the slots of the previous batch, by slot, for plans that continue its state when it was
    #: not committed yet at evaluation time (the next batch is evaluated while it commits)
    pending: dict[int, Any] | None = None
    #: the slots whose plans write this batch in SQL (pushed down: their slots stay empty)
    pushed: frozenset[int] = frozenset()
    #: the batch's offsets ``[start, end)``, set when it is written (pushed-down plans read it)
    span: tuple[int, int] | None = None
    #: sink rows the batch transaction wrote, by sink table (filled by the commit; metrics)
    written: dict[str, int] = field(default_factory=dict)
    #: a pipeline with lookups: the batch's records, evaluated only inside the batch
    #: transaction once the lookup rows are read (``Pipeline.resolve``)
    deferred: list[Any] | None = None
    #: how many of ``dead`` were set aside before ``resolve`` (kept when it runs again)
    kept_dead: int | None = None


"""Job settings: batch sizing, leases and error policy."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

OnError = Literal["dead_letter", "fail"]


@dataclass(frozen=True, slots=True)
class Settings:
    """How a job batches, leases and reacts to bad records.

    * ``batch_size``: most records in one checkpoint transaction. Batches start small and
      grow while they commit within half of ``target_latency``, up to this size. By default
      (``None``) 100,000 for pipelines that write a row per record (append sinks, batch
      handlers) and 400,000 for pipelines that only aggregate or fold: those write one row per
      key touched, so bigger batches write fewer rows, and they read and evaluate their input in
      chunks, so bigger batches cost no memory.
    * ``target_latency``: seconds from reading a batch to its COMMIT that batch sizing aims
      for; a batch that takes longer halves the next ones.
    * ``max_interval``: seconds a batch may wait to fill before it commits anyway.
    * ``poll_interval``: seconds an idle worker sleeps before polling its sources again.
    * ``lease_seconds``: how long a partition lease lasts without renewal (database clock).
    * ``on_error``: ``"dead_letter"`` sends a failing record to ``pgstream.dead_letters``
      in the batch transaction; ``"fail"`` stops the worker without committing it.
    * ``max_retries``: attempts for a batch hitting transient database errors before the
      worker stops with the last error; also the reconnects to a broker source that went
      away (back-off 0.1 s doubling up to 5 s) before the worker stops.
    * ``max_record_attempts``: a batch whose worker died this many times in a row is split
      down to single records and a record that still kills the worker is dead-lettered.
    * ``max_sink_rejections``: when the database rejects a batch's sink rows, its first
      ``max_sink_rejections`` records (all when fewer) are tried alone, rolled back; if each
      is rejected for the same reason (SQLSTATE, column, constraint, type) the sink rejects
      every record and the worker stops with one error, committing nothing of the batch.
      Otherwise the batch is bisected and the bad records alone are dead-lettered. A batch
      of one record counts instead: the ``max_sink_rejections``-th rejected in a row for one
      reason stops the worker. ``0`` turns the check off; otherwise at least 2.
    * ``pushdown``: run a declarative sink path from a ``TableSource`` as one
      ``INSERT ... SELECT`` per batch (see ``pgstream explain``); ``False`` keeps every path
      in Python.
    """

    batch_size: int | None = None
    target_latency: float = 1.0
    max_interval: float = 0.5
    poll_interval: float = 0.1
    lease_seconds: float = 10.0
    on_error: OnError = "dead_letter"
    max_retries: int = 8
    max_record_attempts: int = 3
    max_sink_rejections: int = 8
    pushdown: bool = True

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with the non-None ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    def validate(self) -> None:
        """Raise :class:`~pgstream.errors.ConfigError` for impossible values."""
        from pgstream.errors import ConfigError

        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.target_latency <= 0:
            raise ConfigError(f"target_latency must be > 0, got {self.target_latency}")
        if self.max_interval < 0 or self.poll_interval <= 0:
            raise ConfigError("max_interval must be >= 0 and poll_interval > 0")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.lease_seconds < 1:
            raise ConfigError(f"lease_seconds must be >= 1, got {self.lease_seconds}")
        if self.max_sink_rejections < 0 or self.max_sink_rejections == 1:
            raise ConfigError(
                f"max_sink_rejections must be 0 (no check) or >= 2, got {self.max_sink_rejections}",
                hint="it is how many records in a row must be rejected alone for one reason",
            )
        if self.on_error not in ("dead_letter", "fail"):
            raise ConfigError(f'on_error must be "dead_letter" or "fail", got {self.on_error!r}')

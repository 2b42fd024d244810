"""The audit's outcome: violations, counts and what could not be checked."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: every kind of violation, in report order
KINDS = ("lost", "duplicated", "unexpected", "wrong-value", "ledger-gap", "ledger-overlap")


class CannotVerify(Exception):
    """The audit cannot be carried out (exit code 2); the message says why."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant."""

    kind: str
    sink: str
    source: str = "-"
    partition: str = "-"
    offset: int | None = None
    key: str | None = None
    detail: str = ""

    def describe(self) -> str:
        """One report line."""
        where = f"{self.source}/{self.partition}"
        at = f" offset {self.offset}" if self.offset is not None else ""
        key = f" key {self.key}" if self.key is not None else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.kind:<14} {self.sink} {where}{at}{key}{detail}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "kind": self.kind,
            "sink": self.sink,
            "source": self.source,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "detail": self.detail,
        }


@dataclass(slots=True)
class VerifyReport:
    """The outcome of :func:`verify_app`."""

    job: str
    violations: list[Violation] = field(default_factory=list)
    partitions: int = 0
    records: int = 0
    batches: int = 0
    append_rows: int = 0
    dead_letters: int = 0  # open ones (a redriven record's effect is in the sinks)
    redriven: int = 0  # dead letters `pgstream dlq redrive` applied: checked as sink outputs
    keyed_rows: int = 0
    late_records: int = 0
    unchecked: list[str] = field(default_factory=list)
    #: ranges a source's reset policy skipped (``pgstream.skipped_ranges``): not violations
    skipped: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """No violation found."""
        return not self.violations

    @property
    def exit_code(self) -> int:
        """0 clean, 1 violations."""
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        """Violations per kind (every kind present, zeros included)."""
        c = Counter(v.kind for v in self.violations)
        return {k: c.get(k, 0) for k in KINDS}

    def summary(self) -> str:
        """One line: what was checked and the verdict."""
        verdict = "clean" if self.ok else f"{len(self.violations)} violation(s)"
        kinds = ", ".join(f"{k}={n}" for k, n in self.counts().items() if n)
        return (
            f"verify {self.job}: {verdict}{' (' + kinds + ')' if kinds else ''}; "
            f"{self.partitions} partition(s), {self.records} records in {self.batches} batches, "
            f"{self.append_rows} append rows, {self.dead_letters} dead letters, "
            f"{self.late_records} late records, "
            f"{f'{self.redriven} redriven dead letters, ' if self.redriven else ''}"
            f"{self.keyed_rows} keyed rows checked in {self.elapsed:.2f}s"
            + (f"; {len(self.skipped)} range(s) skipped by policy" if self.skipped else "")
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "job": self.job,
            "ok": self.ok,
            "counts": self.counts(),
            "partitions": self.partitions,
            "records": self.records,
            "batches": self.batches,
            "append_rows": self.append_rows,
            "dead_letters": self.dead_letters,
            "redriven": self.redriven,
            "keyed_rows": self.keyed_rows,
            "late_records": self.late_records,
            "unchecked": self.unchecked,
            "skipped": self.skipped,
            "elapsed": round(self.elapsed, 3),
            "violations": [v.as_dict() for v in self.violations],
        }

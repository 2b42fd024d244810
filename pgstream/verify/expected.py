"""What the sinks must hold: the plans' expectations from the replay, plus what only verify
knows (records that must be dead letters, ranges and tables that cannot be checked)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from pgstream.runtime.sinkplans import Expectations


@dataclass(slots=True)
class Expected:
    """What re-evaluation says every sink must hold."""

    plans: Expectations = field(default_factory=Expectations)
    # (source, partition) -> offsets that must be dead letters
    dead: dict[tuple[str, str], set[int]] = field(default_factory=lambda: defaultdict(set))
    # append table -> (source, partition) -> offset ranges ran under another plan (skipped)
    skip_append: dict[str, dict[tuple[str, str], list[tuple[int, int]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    # keyed table -> why it cannot be checked
    unchecked_tables: dict[str, str] = field(default_factory=dict)

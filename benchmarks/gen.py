"""The deterministic input: JSON Lines events ``{"id", "user", "amount", "ts"}``.

``id`` runs 1..n, ``user`` is one of ``users`` names (``"u0"``...), ``amount`` an integer in
1..1000 and ``ts`` an ISO-8601 UTC timestamp about one millisecond per event apart with up to
five seconds of disorder. The same ``(n, users, seed)`` always gives the same bytes; files are
cached under the data directory.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

BASE_TIME = datetime(2026, 11, 27, tzinfo=timezone.utc)
_CHUNK = 10_000


def event_dicts(n: int, users: int, seed: int, first_id: int = 1) -> Iterator[dict[str, object]]:
    """The events, in order."""
    rng = random.Random(seed)
    names = [f"u{u}" for u in range(users)]
    base_ms = int(BASE_TIME.timestamp() * 1000)
    for i in range(first_id, first_id + n):
        ms = base_ms + i + rng.randrange(5000)
        yield {
            "id": i,
            "user": names[rng.randrange(users)],
            "amount": rng.randint(1, 1000),
            "ts": _iso(ms),
        }


def _iso(ms: int) -> str:
    t = BASE_TIME + timedelta(milliseconds=ms - int(BASE_TIME.timestamp() * 1000))
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def event_lines(n: int, users: int, seed: int, first_id: int = 1) -> Iterator[bytes]:
    """The events as JSON lines (each ending with a newline)."""
    dumps = orjson.dumps
    for e in event_dicts(n, users, seed, first_id):
        yield dumps(e) + b"\n"


def events_file(data_dir: Path, n: int, users: int, seed: int) -> Path:
    """The cached events file for ``(n, users, seed)``, generated on first use."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"events-n{n}-u{users}-s{seed}.jsonl"
    if path.exists():
        return path
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        chunk: list[bytes] = []
        for line in event_lines(n, users, seed):
            chunk.append(line)
            if len(chunk) >= _CHUNK:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))
    os.replace(tmp, path)
    return path

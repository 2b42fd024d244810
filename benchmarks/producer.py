"""A steady producer: appends events to a JSONL file at a fixed rate.

``python -m benchmarks.producer --path FILE --rate 50000 --seconds 10`` writes one block of
``rate * tick`` lines every ``tick`` seconds on an absolute schedule (a late tick is written at
once, so the average rate holds) and prints one JSON line at the end:
``{"ticks": [[wall_time, last_line_offset], ...], "n": events}``, where ``wall_time`` is when
the block's ``write`` returned, i.e. when its records arrived at the source.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.gen import event_lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.producer")
    p.add_argument("--path", required=True)
    p.add_argument("--rate", type=float, default=50_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tick", type=float, default=0.01)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=2)
    args = p.parse_args(argv)

    per_tick = max(1, round(args.rate * args.tick))
    n_ticks = max(1, round(args.seconds / args.tick))
    lines = event_lines(per_tick * n_ticks, args.users, args.seed)
    blocks: list[tuple[bytes, int]] = []  # (bytes, offset of the block's last line within it)
    for _ in range(n_ticks):
        chunk = [next(lines) for _ in range(per_tick)]
        blocks.append((b"".join(chunk), sum(len(x) for x in chunk[:-1])))

    fd = os.open(args.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    offset = os.fstat(fd).st_size
    ticks: list[tuple[float, int]] = []
    t0 = time.monotonic()
    for k, (block, last) in enumerate(blocks):
        delay = t0 + k * args.tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        os.write(fd, block)
        ticks.append((time.time(), offset + last))
        offset += len(block)
    os.close(fd)
    elapsed = time.monotonic() - t0
    sys.stdout.write(
        json.dumps({"ticks": ticks, "n": per_tick * n_ticks, "elapsed": elapsed}) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

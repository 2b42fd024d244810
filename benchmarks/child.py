"""One pgstream worker in its own process, so its peak RSS and crashes are its own.

``python -m benchmarks.child --dsn DSN --workload B2 --source file --path FILE --job JOB``
prints one JSON line: ``{"start", "elapsed", "first_commit", "records", "batches"}`` where
``start`` is the wall clock right before the worker starts (after interpreter start-up and
imports), ``elapsed`` the seconds until it stopped, ``processing`` the seconds from claiming the
partition (its reader opens) to its last COMMIT, ``first_commit`` the wall clock when its first
batch committed.
With ``--forever`` it runs until SIGTERM instead of stopping when caught up; with
``--read-log FILE`` it appends the end offset of every source read to FILE (recovery test);
with ``--gate DIR`` it writes ``DIR/ready-PID`` once imported and waits for ``DIR/go``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.workloads import STREAM, make_app
from pgstream.runtime.task import PartitionTask
from pgstream.runtime.worker import Worker
from pgstream.sources.base import OpenContext, PartitionReader, ReadResult
from pgstream.sources.file import FileReader, JsonLines


class LoggedReader(PartitionReader):
    """Delegates to a reader and records how far each read reached (flushed at once)."""

    def __init__(self, inner: PartitionReader, log_path: str) -> None:
        self.inner = inner
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def read(self, start: int, max_records: int) -> ReadResult:
        res = self.inner.read(start, max_records)
        self.log.write(f"{res.end}\n")
        return res

    def read_raw(self, start: int, max_records: int) -> JsonLines:
        """The file reader's fast path, logged the same way."""
        assert isinstance(self.inner, FileReader)
        lines = self.inner.read_raw(start, max_records)
        self.log.write(f"{lines.end}\n")
        return lines

    def head(self) -> int | None:
        return self.inner.head()

    def close(self) -> None:
        self.inner.close()
        self.log.close()


def peak_rss_mb() -> float | None:
    """This process's peak resident set size since it exec'd (``VmHWM``), in MiB.

    ``ru_maxrss`` would not do: Linux carries the forking parent's peak over ``execve``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.child")
    p.add_argument("--dsn", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--forever", action="store_true")
    p.add_argument("--read-log", default=None)
    p.add_argument("--gate", default=None, help="directory: write ready-PID, wait for go")
    args = p.parse_args(argv)

    app = make_app(args.workload, args.source, args.path, args.job, batch_size=args.batch_size)
    source = app.sources[STREAM]
    open_reader = source.open
    opened: list[float] = []
    opened_wall: list[float] = []

    def timed_open(partition: str, context: OpenContext) -> PartitionReader:
        opened.append(time.perf_counter())
        opened_wall.append(time.time())
        reader = open_reader(partition, context)
        return LoggedReader(reader, args.read_log) if args.read_log else reader

    source.open = timed_open  # type: ignore[method-assign]

    first_commit: list[float] = []
    last_commit: list[float] = [0.0]
    last_commit_wall: list[float] = [0.0]

    def on_commit(task: PartitionTask, n: int) -> None:
        if not first_commit:
            first_commit.append(time.time())
        last_commit[0] = time.perf_counter()
        last_commit_wall[0] = time.time()

    worker = Worker(app, args.dsn, stop_when_idle=not args.forever, on_commit=on_commit)
    if args.gate:  # several workers start together, interpreter start-up and imports done
        gate = Path(args.gate)
        (gate / f"ready-{os.getpid()}").touch()
        while not (gate / "go").exists():
            time.sleep(0.005)
    start = time.time()
    t0 = time.perf_counter()
    summary = worker.run()
    elapsed = time.perf_counter() - t0
    out: dict[str, Any] = {
        "peak_rss_mb": peak_rss_mb(),
        "start": start,
        "elapsed": elapsed,
        # from claiming the partition (its reader opens) to the last COMMIT: start-up excluded
        "processing": last_commit[0] - opened[0] if opened and first_commit else None,
        "first_commit": first_commit[0] if first_commit else None,
        # wall clock, to combine several workers: first reader opened, last COMMIT
        "opened_wall": opened_wall[0] if opened_wall else None,
        "last_commit_wall": last_commit_wall[0] if first_commit else None,
        "records": summary.records,
        "batches": summary.batches,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

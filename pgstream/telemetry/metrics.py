"""Prometheus metrics of a running job (``pgstream run --metrics-port PORT``).

:class:`MetricsObserver` is a :class:`~pgstream.runtime.observers.WorkerObserver` that counts what
a worker does; :func:`serve` exposes a registry over HTTP. Every name starts with ``pgstream_``
and carries the ``job`` label; see :data:`METRICS` (the list the README and the Grafana
dashboard ``deploy/grafana/pgstream.json`` use).

With ``--workers N`` the supervisor serves the port and its worker processes write their values
to files in a directory the supervisor owns (prometheus-client's multiprocess mode, through
``PROMETHEUS_MULTIPROC_DIR``): counters and histograms are summed over the workers (including
workers that died and were restarted), ``pgstream_partition_lag`` and
``pgstream_committed_offset`` take the largest value a live worker reports for a partition
and ``pgstream_owned_partitions`` the sum over the live workers.

``prometheus-client`` is an optional dependency (the ``metrics`` extra), imported only here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pgstream.errors import ConfigError
from pgstream.runtime.leases import Lease
from pgstream.runtime.observers import WorkerObserver
from pgstream.runtime.pipeline import BatchOutput, DeadLetter

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pgstream.runtime.progress import Progress
    from pgstream.runtime.task import PartitionTask

__all__ = [
    "DEFAULT_HOST",
    "METRICS",
    "MULTIPROC_ENV",
    "WORKER_ENV",
    "MetricsObserver",
    "MultiprocessMetrics",
    "multiprocess_dir",
    "serve",
]

#: the environment variable prometheus-client reads (at import) to write values to files
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: set by the supervisor for its workers: the same directory, and "the supervisor serves"
WORKER_ENV = "PGSTREAM_METRICS_DIR"

#: (name, type, labels, help) of every metric, in the order the README lists them
METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("pgstream_records_in_total", "counter", ("job", "stream"),
     "Input records committed (each counted once, in the batch that committed it)."),
    ("pgstream_records_out_total", "counter", ("job", "sink"),
     "Rows written to each sink table by committed batches (upserts count once per key)."),
    ("pgstream_batches_total", "counter", ("job", "stream"), "Batches committed."),
    ("pgstream_batch_records", "histogram", ("job", "stream"), "Input records per batch."),
    ("pgstream_commit_seconds", "histogram", ("job", "stream"),
     "Seconds a batch transaction took, from BEGIN to COMMIT, retries included."),
    ("pgstream_partition_lag", "gauge", ("job", "stream", "partition"),
     "Source head minus committed offset, in the source's offset units (owned partitions)."),
    ("pgstream_committed_offset", "gauge", ("job", "stream", "partition"),
     "Committed offset of each owned partition."),
    ("pgstream_dead_letters_total", "counter", ("job", "stream"),
     "Records set aside as dead letters by committed batches."),
    ("pgstream_late_records_total", "counter", ("job", "stream"),
     "Records set aside as late (event time) by committed batches."),
    ("pgstream_retries_total", "counter", ("job", "stream", "error"),
     "Batch transactions retried after a transient error, by error class."),
    ("pgstream_fencing_rejections_total", "counter", ("job", "stream", "where"),
     "Leases lost to a newer epoch: at a batch (stale epoch) or at renewal (taken over)."),
    ("pgstream_partition_claims_total", "counter", ("job", "stream"),
     "Partitions claimed (start-up, takeover after a lease expired, rebalance)."),
    ("pgstream_takeovers_total", "counter", ("job", "stream"),
     "Claims that took a partition from another worker whose lease expired or whose session "
     "is gone (a subset of the claims)."),
    ("pgstream_partition_releases_total", "counter", ("job", "stream"),
     "Partitions given up (rebalance to a new worker, clean stop)."),
    ("pgstream_rebalances_total", "counter", ("job", "stream"),
     "Partitions handed over to bring the workers to fair shares (a subset of the releases)."),
    ("pgstream_owned_partitions", "gauge", ("job",), "Partitions the workers hold now."),
)

#: batch sizes in records
SIZE_BUCKETS = (1, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, float("inf"))
#: commit latency in seconds
SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf")
)
#: how each gauge combines the values of several worker processes (multiprocess mode)
_GAUGE_MODES = {
    "pgstream_partition_lag": "livemax",
    "pgstream_committed_offset": "livemax",
    "pgstream_owned_partitions": "livesum",
}

_INSTALL = (
    "--metrics-port needs prometheus-client: pip install 'pgstream-engine[metrics]'"
)


def prometheus() -> ModuleType:
    """The prometheus_client module, imported on first use (an optional dependency)."""
    try:
        import prometheus_client
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(_INSTALL) from None
    return prometheus_client


def _build(registry: CollectorRegistry) -> dict[str, Any]:
    """Create every metric of :data:`METRICS` in ``registry``."""
    pc = prometheus()
    made: dict[str, Any] = {}
    for name, kind, labels, text in METRICS:
        short = name.removesuffix("_total")  # prometheus-client adds it to counters
        if kind == "counter":
            made[name] = pc.Counter(short, text, labels, registry=registry)
        elif kind == "histogram":
            buckets = SIZE_BUCKETS if name == "pgstream_batch_records" else SECONDS_BUCKETS
            made[name] = pc.Histogram(name, text, labels, registry=registry, buckets=buckets)
        else:
            made[name] = pc.Gauge(
                name, text, labels, registry=registry, multiprocess_mode=_GAUGE_MODES[name]
            )
    return made


class MetricsObserver(WorkerObserver):
    """Counts a worker's events into Prometheus metrics (:data:`METRICS`).

    ``registry``: where the metrics live (a new one by default; in a worker of ``--workers N``
    their values go to the multiprocess files whatever the registry).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus().CollectorRegistry()
        self.m = _build(self.registry)
        self.job = ""
        self._tasks: dict[tuple[str, str], PartitionTask] = {}
        self._owned: set[tuple[str, str]] = set()

    # -- lifecycle and leases -------------------------------------------------------------------

    def started(self, job: str, streams: int, partitions: int) -> None:
        self.job = job
        self.m["pgstream_owned_partitions"].labels(job).set(0)

    def claimed(self, lease: Lease) -> None:
        self.m["pgstream_partition_claims_total"].labels(self.job, lease.source).inc()
        if lease.takeover:
            self.m["pgstream_takeovers_total"].labels(self.job, lease.source).inc()
        self._owned.add((lease.source, lease.partition))
        self.m["pgstream_owned_partitions"].labels(self.job).set(len(self._owned))
        if lease.committed_offset is not None:
            offset = self.m["pgstream_committed_offset"]
            offset.labels(self.job, lease.source, lease.partition).set(lease.committed_offset)

    def released(self, lease: Lease) -> None:
        self.m["pgstream_partition_releases_total"].labels(self.job, lease.source).inc()
        self._forget(lease)

    def handed_over(self, lease: Lease) -> None:
        self.m["pgstream_rebalances_total"].labels(self.job, lease.source).inc()

    def fenced(self, lease: Lease, reason: str) -> None:
        where = "renewal" if reason == "taken over" else "batch"
        self.m["pgstream_fencing_rejections_total"].labels(self.job, lease.source, where).inc()
        self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        """The partition is no longer this worker's: its per-partition gauges go away (in a
        worker of ``--workers N`` they drop to 0 instead: the new owner's value is the larger,
        and prometheus-client cannot remove a series from a multiprocess file)."""
        key = (lease.source, lease.partition)
        self._owned.discard(key)
        self._tasks.pop(key, None)
        self.m["pgstream_owned_partitions"].labels(self.job).set(len(self._owned))
        for name in ("pgstream_partition_lag", "pgstream_committed_offset"):
            gauge = self.m[name]
            labels = (self.job, lease.source, lease.partition)
            gauge.labels(*labels).set(0)
            if MULTIPROC_ENV not in os.environ:
                gauge.remove(*labels)

    def stopped(self, summary: Any) -> None:
        self._owned.clear()
        self._tasks.clear()
        if self.job:
            self.m["pgstream_owned_partitions"].labels(self.job).set(0)

    # -- batches --------------------------------------------------------------------------------

    def batch_committed(self, task: PartitionTask, out: BatchOutput, seconds: float) -> None:
        job, stream = task.job, task.source
        self.m["pgstream_records_in_total"].labels(job, stream).inc(out.records_in)
        self.m["pgstream_batches_total"].labels(job, stream).inc()
        self.m["pgstream_batch_records"].labels(job, stream).observe(out.records_in)
        self.m["pgstream_commit_seconds"].labels(job, stream).observe(seconds)
        for sink, rows in out.written.items():
            self.m["pgstream_records_out_total"].labels(job, sink).inc(rows)

    def committed(self, task: PartitionTask, records: int) -> None:
        self._tasks[(task.source, task.partition)] = task
        self._gauges(task)

    def dead_lettered(self, task: PartitionTask, dead: Sequence[DeadLetter]) -> None:
        self.m["pgstream_dead_letters_total"].labels(task.job, task.source).inc(len(dead))

    def late_records(self, task: PartitionTask, records: int) -> None:
        self.m["pgstream_late_records_total"].labels(task.job, task.source).inc(records)

    def retried(self, task: PartitionTask, attempt: int, error: BaseException | None) -> None:
        kind = type(error).__name__ if error is not None else "unknown"
        self.m["pgstream_retries_total"].labels(task.job, task.source, kind).inc()

    def polled(self, progress: Callable[[], Progress]) -> None:
        """Refresh the lag of every partition committed to so far (the head moves on)."""
        for task in self._tasks.values():
            self._gauges(task)

    def _gauges(self, task: PartitionTask) -> None:
        labels = (task.job, task.source, task.partition)
        self.m["pgstream_committed_offset"].labels(*labels).set(task.position)
        if task.head is not None:
            lag = max(0, task.head - task.position)
            self.m["pgstream_partition_lag"].labels(*labels).set(lag)


#: the address the metrics endpoint binds unless ``--metrics-host`` says otherwise
DEFAULT_HOST = "0.0.0.0"


def serve(port: int, registry: CollectorRegistry, host: str = DEFAULT_HOST) -> Callable[[], None]:
    """Serve ``registry`` at ``http://host:port/metrics`` on a daemon thread; return a function
    that stops the server. A port in use or an address that cannot be bound is one clear
    error."""
    pc = prometheus()
    try:
        server, thread = pc.start_http_server(port, addr=host or DEFAULT_HOST, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on port {port} of {host or DEFAULT_HOST}: "
            f"{exc.strerror or exc}",
            hint="pick a free port with --metrics-port, or an address of this machine with "
            "--metrics-host",
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


class MultiprocessMetrics:
    """The supervisor's side of ``--workers N --metrics-port PORT``: a directory for the
    workers' value files, served merged on ``port``; a dead worker's live gauges are dropped."""

    def __init__(self, port: int, host: str = DEFAULT_HOST) -> None:
        self.port = port
        self.host = host
        self.path = tempfile.mkdtemp(prefix="pgstream-metrics-")
        self._stop: Callable[[], None] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for the workers: where to write their values."""
        return {MULTIPROC_ENV: self.path, WORKER_ENV: self.path}

    def start(self) -> None:
        """Serve the merged values."""
        pc = prometheus()
        from prometheus_client import multiprocess

        registry = pc.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.path)  # type: ignore[no-untyped-call]
        self._stop = serve(self.port, registry, self.host)

    def worker_ended(self, pid: int) -> None:
        """A worker process ended: its live gauges no longer count."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stop serving and remove the directory."""
        if self._stop is not None:
            self._stop()
            self._stop = None
        shutil.rmtree(self.path, ignore_errors=True)


def multiprocess_dir() -> str | None:
    """The directory this process writes its values to when it is a worker of a supervisor
    serving the metrics (``--workers N``), else None."""
    return os.environ.get(WORKER_ENV) or None

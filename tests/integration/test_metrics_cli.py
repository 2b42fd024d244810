"""``pgstream run --metrics-port``: metrics scraped over HTTP from a real run match the ledger.

A real ``pgstream run`` process (one worker, then ``--workers 2`` with the supervisor serving
the merged metrics) over JSON Lines files; the metrics are scraped while it runs and, once the
ledger holds every record, must equal what ``pgstream.batches``, ``pgstream.dead_letters``,
``pgstream.partitions`` and the sink table say. ``--log-format json`` lines must parse.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proctools import children_of, wait_for
from prometheus_client.parser import text_string_to_metric_families

APP = """
import os
import time
import pgstream as ps

LEASE = os.environ.get("LEASE")
app = ps.App("metered", **({"lease_seconds": float(LEASE)} if LEASE else {}))
orders = app.stream("orders", ps.FileSource(os.environ["ORDERS"]))
# every 97th record makes the map raise: a dead letter
orders.map(lambda o: {"id": o["id"] // (o["id"] % 97)}).to_table("ids")


@app.batch(orders)
def slow(batch: ps.Batch) -> None:
    time.sleep(float(os.environ.get("BATCH_SLEEP", "0")))
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples | None:
    """Every sample at /metrics by (name, labels), or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def per_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name:
            found[dict(ls)[label]] += v
    return dict(found)


def setup(tmp_path: Path, conn: psycopg.Connection[Any], files: dict[str, range]) -> dict[str, str]:
    (tmp_path / "app.py").write_text(APP)
    landing = tmp_path / "landing"
    landing.mkdir()
    for name, ids in files.items():
        (landing / name).write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    conn.execute(
        "CREATE TABLE ids (id bigint, _source text, _partition text, _offset bigint, _seq int,"
        " UNIQUE (_source, _partition, _offset, _seq))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    glob = str(landing / "*.jsonl") if len(files) > 1 else str(landing / next(iter(files)))
    env.update(ORDERS=glob, PYTHONUNBUFFERED="1", BATCH_SLEEP="0.01")
    return env


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        kids = children_of(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)


def start(
    tmp_path: Path, env: dict[str, str], dsn: str, *args: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgstream", "run", "app:app", "--dsn", dsn, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def ledger(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """What the database says the job did."""
    row = conn.execute(
        "SELECT count(*), COALESCE(sum(records_in), 0), COALESCE(sum(records_out), 0),"
        " COALESCE(sum(dead_letters), 0) FROM pgstream.batches WHERE job = 'metered'"
    ).fetchone()
    assert row is not None
    offsets = dict(
        conn.execute(
            "SELECT partition, committed_offset FROM pgstream.partitions WHERE job = 'metered'"
        ).fetchall()
    )
    dead = conn.execute("SELECT count(*) FROM pgstream.dead_letters").fetchone()
    rows = conn.execute("SELECT count(*) FROM ids").fetchone()
    assert dead is not None and rows is not None
    return {
        "batches": row[0],
        "records_in": row[1],
        "records_out": row[2],
        "ledger_dead": row[3],
        "dead_letters": dead[0],
        "sink_rows": rows[0],
        "offsets": offsets,
    }


def metrics_view(samples: Samples) -> dict[str, Any]:
    """The same numbers, as the metrics tell them."""
    offsets = {
        dict(ls)["partition"]: int(v)
        for (n, ls), v in samples.items()
        if n == "pgstream_committed_offset"
    }
    return {
        "batches": int(total(samples, "pgstream_batches_total", job="metered", stream="orders")),
        "records_in": int(total(samples, "pgstream_records_in_total", stream="orders")),
        "records_out": int(total(samples, "pgstream_records_out_total", sink="public.ids")),
        "ledger_dead": int(total(samples, "pgstream_dead_letters_total", stream="orders")),
        "dead_letters": int(total(samples, "pgstream_dead_letters_total")),
        "sink_rows": int(total(samples, "pgstream_records_out_total")),
        "offsets": offsets,
    }


def check_against_ledger(port: int, conn: psycopg.Connection[Any], n: int) -> Samples:
    """Scrape while the job runs (the metrics never run ahead of the ledger), then, once the
    ledger holds all ``n`` records, until the metrics equal it; return the last scrape."""
    wait_for(lambda: scrape(port), 30, what="the metrics endpoint")
    seen_partial = False
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, f"the ledger never held all {n} records"
        samples = scrape(port)
        assert samples is not None
        counted = int(total(samples, "pgstream_records_in_total"))
        after = ledger(conn)
        assert counted <= after["records_in"]  # a batch is counted only once committed
        if 0 < counted < n:
            seen_partial = True
        if after["records_in"] == n:
            break
        time.sleep(0.05)
    assert seen_partial, "the run ended before a scrape saw it in progress"
    expected = ledger(conn)
    assert expected["records_in"] == n and expected["sink_rows"] == expected["records_out"]
    assert expected["dead_letters"] == expected["ledger_dead"] > 0

    def agrees() -> Samples:
        s = scrape(port)
        return s if s is not None and metrics_view(s) == expected else {}

    try:
        return wait_for(agrees, 10, what="metrics equal to the ledger")
    except AssertionError:
        final = scrape(port)
        assert final is not None
        assert metrics_view(final) == expected  # shows the difference
        raise


def test_metrics_of_one_worker_match_the_ledger(
    tmp_path: Path,
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    procs: list[subprocess.Popen[str]],
) -> None:
    n = 2000
    env = setup(tmp_path, pg_conn, {"orders.jsonl": range(1, n + 1)})
    port = free_port()
    proc = start(
        tmp_path, env, pg_dsn, "--metrics-port", str(port), "--batch-size", "40",
        "--log-format", "json", "--progress-interval", "0.2", "-v",
    )
    procs.append(proc)
    samples = check_against_ledger(port, pg_conn, n)
    batches = total(samples, "pgstream_batches_total")
    assert total(samples, "pgstream_batch_records_count") == batches
    assert total(samples, "pgstream_batch_records_sum") == n
    assert total(samples, "pgstream_commit_seconds_count") == batches
    assert 0 < total(samples, "pgstream_commit_seconds_sum") < 60
    assert total(samples, "pgstream_partition_lag", partition="0") == 0
    assert total(samples, "pgstream_owned_partitions", job="metered") == 1
    assert total(samples, "pgstream_partition_claims_total", stream="orders") == 1
    assert total(samples, "pgstream_fencing_rejections_total") == 0
    assert total(samples, "pgstream_late_records_total") == 0

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines, "no log lines"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["job"] == "metered", line
    loggers = {line["logger"] for line in lines}
    assert {"pgstream.progress", "pgstream.worker"} <= loggers
    claimed = [line for line in lines if line["message"].startswith("claimed ")]
    assert claimed and claimed[0]["stream"] == "orders" and claimed[0]["partition"] == "0"
    # the final summary is a JSON line too
    assert lines[-1]["message"].startswith("metered: 2000 records in "), lines[-1]


def test_metrics_of_two_workers_are_served_merged_by_the_supervisor(
    tmp_path: Path,
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    procs: list[subprocess.Popen[str]],
) -> None:
    files = {f"f{i}.jsonl": range(1 + i * 1000, 1 + (i + 1) * 1000) for i in range(4)}
    env = setup(tmp_path, pg_conn, files)
    port = free_port()
    proc = start(
        tmp_path, env, pg_dsn, "--workers", "2", "--metrics-port", str(port),
        "--metrics-host", "127.0.0.1", "--batch-size", "40",
    )
    procs.append(proc)
    kids = wait_for(
        lambda: children_of(proc.pid) if len(children_of(proc.pid)) == 2 else [],
        30,
        what="two workers",
    )
    for kid in kids:  # the workers serve nothing themselves
        cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        assert b"--metrics-port" not in cmdline and b"--metrics-host" not in cmdline
    samples = check_against_ledger(port, pg_conn, 4000)
    assert total(samples, "pgstream_owned_partitions", job="metered") == 4
    claims = per_label(samples, "pgstream_partition_claims_total", "stream")
    releases = per_label(samples, "pgstream_partition_releases_total", "stream")
    # each partition held by one worker now: claimed once more than released
    assert claims.get("orders", 0) - releases.get("orders", 0) == 4
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_a_port_in_use_is_one_clear_error(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env = setup(tmp_path, pg_conn, {"orders.jsonl": range(1, 10)})
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "pgstream", "run", "app:app", "--dsn", pg_dsn,
             "--metrics-port", str(port)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert f"error: cannot serve metrics on port {port}" in done.stderr
    assert "hint: pick a free port with --metrics-port" in done.stderr
    assert "Traceback" not in done.stderr
    # an address that is not this machine's (TEST-NET-3), and a host without a port
    base = [sys.executable, "-m", "pgstream", "run", "app:app", "--dsn", pg_dsn]
    for more, said in (
        (["--metrics-port", str(free_port()), "--metrics-host", "203.0.113.7"], "of 203.0.113.7"),
        (["--metrics-host", "127.0.0.1"], "--metrics-host is the address of --metrics-port"),
    ):
        done = subprocess.run(
            [*base, *more], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_worker_killed_and_restarted_keeps_its_counts_in_the_merged_metrics(
    tmp_path: Path,
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    procs: list[subprocess.Popen[str]],
) -> None:
    """SIGKILL one of two workers mid-run: the supervisor restarts it, and the merged counters
    still equal the ledger at the end (the dead worker's counts stay; its gauges go)."""
    files = {f"f{i}.jsonl": range(1 + i * 1000, 1 + (i + 1) * 1000) for i in range(4)}
    env = setup(tmp_path, pg_conn, files)
    env["BATCH_SLEEP"] = "0.02"
    port = free_port()
    proc = start(
        tmp_path, env, pg_dsn, "--workers", "2", "--metrics-port", str(port),
        "--batch-size", "20",
    )
    procs.append(proc)
    kids = wait_for(
        lambda: children_of(proc.pid) if len(children_of(proc.pid)) == 2 else [],
        30,
        what="two workers",
    )

    def counted() -> float:
        s = scrape(port)
        return total(s, "pgstream_records_in_total") if s else 0

    wait_for(lambda: counted() > 400, 60, what="both workers under way")
    os.kill(kids[0], signal.SIGKILL)
    wait_for(
        lambda: len(children_of(proc.pid)) == 2 and kids[0] not in children_of(proc.pid),
        30,
        what="the killed worker restarted",
    )
    samples = check_against_ledger(port, pg_conn, 4000)
    # the restarted worker claimed again: claims exceed the partitions
    assert total(samples, "pgstream_partition_claims_total") > 4
    assert total(samples, "pgstream_owned_partitions", job="metered") == 4
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "was killed by SIGKILL; restarting" in err


def test_a_takeover_after_a_sigkill_is_counted_apart_from_the_claims(
    tmp_path: Path,
    pg_dsn: str,
    pg_conn: psycopg.Connection[Any],
    procs: list[subprocess.Popen[str]],
) -> None:
    """Worker A holds both partitions; B joins and A hands one over (a rebalance: a claim for
    B, no takeover); A is SIGKILLed and B takes its other partition over (a takeover, after
    the short lease at the latest). B's claims (2) are not its takeovers (1)."""
    files = {f"f{i}.jsonl": range(1 + i * 1500, 1 + (i + 1) * 1500) for i in range(2)}
    env = setup(tmp_path, pg_conn, files)
    env.update(BATCH_SLEEP="0.05", LEASE="3")
    port_a, port_b = free_port(), free_port()
    a = start(tmp_path, env, pg_dsn, "--metrics-port", str(port_a), "--batch-size", "20")
    procs.append(a)

    def value(port: int, name: str) -> float:
        s = scrape(port)
        return total(s, name, job="metered") if s else -1

    wait_for(lambda: value(port_a, "pgstream_owned_partitions") == 2, 60, what="A owns both")
    wait_for(lambda: value(port_a, "pgstream_records_in_total") > 0, 60, what="A committing")
    b = start(
        tmp_path, env, pg_dsn, "--metrics-port", str(port_b), "--metrics-host", "127.0.0.1",
        "--batch-size", "20", "-v",
    )
    procs.append(b)
    wait_for(lambda: value(port_b, "pgstream_owned_partitions") == 1, 60, what="B's share")
    assert value(port_a, "pgstream_rebalances_total") == 1  # A handed one over
    assert value(port_a, "pgstream_partition_releases_total") == 1
    assert value(port_a, "pgstream_takeovers_total") == 0
    assert value(port_b, "pgstream_partition_claims_total") == 1
    assert value(port_b, "pgstream_takeovers_total") == 0  # a hand-over is no takeover
    owners = pg_conn.execute("SELECT DISTINCT owner FROM pgstream.partitions").fetchall()
    a_id = next(o for (o,) in owners if f":{a.pid}:" in (o or ""))
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(10)
    wait_for(lambda: value(port_b, "pgstream_owned_partitions") == 2, 60, what="B took over")
    wait_for(
        lambda: ledger(pg_conn)["records_in"] == 3000, 120, what="B to finish both partitions"
    )
    samples = scrape(port_b)
    assert samples is not None
    claims = total(samples, "pgstream_partition_claims_total", job="metered", stream="orders")
    takeovers = total(samples, "pgstream_takeovers_total", job="metered", stream="orders")
    assert (claims, takeovers) == (2, 1)
    assert total(samples, "pgstream_rebalances_total") == 0
    # exactly once across the kill: one row per valid record, a dead letter per 97th
    done = ledger(pg_conn)
    assert done["sink_rows"] == 3000 - 3000 // 97 and done["dead_letters"] == 3000 // 97
    b.send_signal(signal.SIGTERM)
    _, err = b.communicate(timeout=60)
    assert b.returncode == 0, err
    assert f"taken over from {a_id}" in err, err[-3000:]  # B's log names the dead worker

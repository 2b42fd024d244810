"""Worker groups over every partitioned source (issue 12, part 6) while a producer keeps
adding records: real ``pgstream run`` processes, a SIGKILLed one, a joining one and, for Kafka,
one frozen with SIGSTOP past its lease and resumed (a zombie the epoch must fence). At the end
every record's effect is in the sinks exactly once (``facts`` one row per valid record,
``per_user`` the reference aggregates, malformed records in the dead letters), the ledger
tiles every partition and ``pgstream verify`` is clean.

The app (``brokerapp``, job ``brokers``) reads one stream per partition-holding source: a
six-partition Kafka topic, four NATS JetStream streams, four Redis stream keys, four files
under ``landing/`` or a table split in four by ``user``; every stream feeds the same two
sinks (a union).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import broker_jobs as bj
import psycopg
import pytest
from harness import WorkerProc, wait_for

APP = """
import os

import pgstream as ps

app = ps.App({job!r}, batch_size=int(os.environ.get("BATCH", "200")), max_interval=0.0,
             lease_seconds=float(os.environ.get("LEASE", "3")))


def fact(e):
    return {{"id": int(e["id"]), "user": int(e["user"]), "amount": int(e["amount"])}}


for name, source in [{streams}]:
    events = app.stream(name, source)
    events.map(fact).to_table("facts")
    events.key_by("user").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("per_user")
"""

LEASE = 3.0
BAD_EVERY = 97


class Feed(Protocol):
    """Where records go: ``add`` writes events ``ids`` (spread over the partitions)."""

    streams: list[tuple[str, str]]  # (stream name, source expression)
    partitions: int
    bad: bool  # whether malformed payloads can be written

    def add(self, ids: list[int]) -> None: ...

    def close(self) -> None: ...


def _payload(i: int, bad: bool) -> bytes:
    return b'{"id": ' + str(i).encode() + b", oops" if bad and i % BAD_EVERY == 3 else bj.event(i)


class KafkaFeed:
    def __init__(self, bootstrap: str, partitions: int = 6) -> None:
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

        self.topic = f"group-{uuid.uuid4().hex[:8]}"
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        config = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
        for f in self.admin.create_topics([NewTopic(self.topic, partitions, 1, config=config)]
                                          ).values():
            f.result(10)
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.partitions = partitions
        self.bad = True
        self.streams = [
            ("events", f"ps.KafkaSource({self.topic!r}, bootstrap_servers={bootstrap!r})")
        ]

    def add(self, ids: list[int]) -> None:
        for i in ids:
            self.producer.produce(self.topic, _payload(i, True), partition=i % self.partitions)
        assert self.producer.flush(10) == 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for f in self.admin.delete_topics([self.topic]).values():
                f.result(10)


class NatsFeed:
    SERVER = "nats://127.0.0.1:4222"

    def __init__(self, partitions: int = 4) -> None:
        tag = uuid.uuid4().hex[:8].upper()
        self.names = [f"PGSGROUP_{tag}_{k}" for k in range(partitions)]
        self.partitions = partitions
        self.bad = True
        self.streams = [
            (f"s{k}", f"ps.NatsSource({n!r}, servers={self.SERVER!r})")
            for k, n in enumerate(self.names)
        ]
        asyncio.run(self._run(self._create))

    async def _run(self, action: Any, *args: Any) -> None:
        import nats

        nc = await nats.connect(self.SERVER)
        try:
            await action(nc, *args)
        finally:
            await nc.close()

    async def _create(self, nc: Any) -> None:
        for n in self.names:
            await nc.jetstream().add_stream(name=n, subjects=[f"{n}.>"])

    async def _publish(self, nc: Any, ids: list[int]) -> None:
        js = nc.jetstream()
        for i in ids:
            await js.publish(f"{self.names[i % self.partitions]}.e", _payload(i, True))

    async def _delete(self, nc: Any) -> None:
        for n in self.names:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(n)

    def add(self, ids: list[int]) -> None:
        asyncio.run(self._run(self._publish, ids))

    def close(self) -> None:
        asyncio.run(self._run(self._delete))


class RedisFeed:
    URL = "redis://127.0.0.1:6379"

    def __init__(self, partitions: int = 4) -> None:
        import redis

        tag = uuid.uuid4().hex[:8]
        self.keys = [f"pgsgroup:{tag}:{k}" for k in range(partitions)]
        self.client = redis.Redis.from_url(self.URL)
        self.partitions = partitions
        self.bad = True
        self.streams = [
            (f"s{k}", f"ps.RedisStreamSource({key!r}, url={self.URL!r})")
            for k, key in enumerate(self.keys)
        ]

    def add(self, ids: list[int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.xadd(self.keys[i % self.partitions], {"data": _payload(i, True)})
        pipe.execute()

    def close(self) -> None:
        self.client.delete(*self.keys)
        self.client.close()


class FilesFeed:
    def __init__(self, landing: Path, partitions: int = 4) -> None:
        landing.mkdir()
        self.files = [landing / f"p{k}.jsonl" for k in range(partitions)]
        for f in self.files:
            f.touch()
        self.partitions = partitions
        self.bad = True
        self.streams = [("events", f"ps.FileSource({str(landing / '*.jsonl')!r})")]

    def add(self, ids: list[int]) -> None:
        chunks: dict[int, list[bytes]] = {}
        for i in ids:
            chunks.setdefault(i % self.partitions, []).append(_payload(i, True) + b"\n")
        for k, lines in chunks.items():
            with open(self.files[k], "ab") as out:
                out.write(b"".join(lines))

    def close(self) -> None:
        pass


class TableFeed:
    DDL = """
    CREATE TABLE events (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        "user" int NOT NULL, amount int NOT NULL)
    """

    def __init__(self, dsn: str, partitions: int = 4) -> None:
        self.dsn = dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(self.DDL)
        self.partitions = partitions
        self.bad = False
        self.streams = [(
            "events",
            f"ps.TableSource('public.events', offset_column='id', partitions={partitions}, "
            "partition_by='user')",
        )]

    def add(self, ids: list[int]) -> None:
        # one writer, ids in order, each insert committed before the next: none commits
        # behind a row already read
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.executemany(
                'INSERT INTO events (id, "user", amount) VALUES (%s, %s, %s)',
                [(i, i % 7, i % 50) for i in ids],
            )

    def close(self) -> None:
        pass


class Producer:
    """A thread adding ``chunk`` new events to ``feed`` every ``every`` seconds."""

    def __init__(self, feed: Feed, first: int, chunk: int = 40, every: float = 0.05) -> None:
        self.feed = feed
        self.next = first
        self.chunk = chunk
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop; the first id not written."""
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, f"producer failed: {self.errors[0]!r}"
        return self.next

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.feed.add(list(range(self.next, self.next + self.chunk)))
                self.next += self.chunk
                self._stop.wait(self.every)
        except BaseException as exc:
            self.errors.append(exc)


class Group:
    """The job's ``pgstream run`` processes, started in ``tmp``."""

    def __init__(self, tmp: Path, dsn: str) -> None:
        self.tmp = tmp
        self.dsn = dsn
        self.workers: list[WorkerProc] = []

    def start(self, *args: str) -> WorkerProc:
        log = self.tmp / f"worker-{len(self.workers) + 1}.log"
        env = {**os.environ, "LEASE": str(LEASE), "BATCH": "200", "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pgstream", "run", "brokerapp:app", "--dsn", self.dsn,
                 "-v", *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.tmp,
                start_new_session=True,
            )
        worker = WorkerProc(proc, log, time.monotonic())
        self.workers.append(worker)
        return worker

    def owners(self) -> dict[tuple[str, str], str | None]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT source, partition, CASE WHEN lease_expires_at > now() THEN owner END "
                "FROM pgstream.partitions WHERE job = %s", [bj.JOB],
            ).fetchall()
        return {(s, p): o for s, p, o in rows}

    def owned_by_live(self, live: list[WorkerProc], partitions: int) -> bool:
        """Every partition has a live lease held by one of ``live``, and each of them holds
        some."""
        owners = self.owners()
        tags = {f":{w.pid}:" for w in live}
        held = [next((t for t in tags if o and t in o), None) for o in owners.values()]
        return len(owners) == partitions and None not in held and set(held) == tags

    def wait_joined(self, worker: WorkerProc) -> float:
        """Wait until ``worker`` announced itself to the group (its first heartbeat, after
        its interpreter start-up); ``time.monotonic()`` then."""
        def joined() -> bool:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pgstream.workers WHERE job = %s AND worker LIKE %s",
                    [bj.JOB, f"%:{worker.pid}:%"],
                ).fetchone()
            return bool(row and row[0])

        wait_for(joined, 30, interval=0.02, what=f"worker {worker.pid} to join")
        return time.monotonic()

    def cleanup(self) -> None:
        for w in self.workers:
            if w.alive():
                with contextlib.suppress(Exception):
                    w.kill()


@pytest.fixture(scope="module")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed")
    try:
        with bj.tansu_broker(tmp_path_factory.mktemp("tansu") / "tansu.log") as bootstrap:
            yield bootstrap
    except bj.BrokerUnavailable as exc:
        pytest.skip(str(exc))


def _feed(kind: str, tmp: Path, dsn: str, request: pytest.FixtureRequest) -> Feed:
    if kind == "kafka":
        return KafkaFeed(request.getfixturevalue("kafka_bootstrap"))
    if kind == "nats":
        pytest.importorskip("nats", reason="nats-py is not installed")
        return NatsFeed()
    if kind == "redis":
        pytest.importorskip("redis", reason="redis is not installed")
        return RedisFeed()
    if kind == "files":
        return FilesFeed(tmp / "landing")
    return TableFeed(dsn)


def _finish_and_check(
    group: Group, feed: Feed, conn: psycopg.Connection[Any], produced: int
) -> None:
    final = group.start("--stop-when-idle")
    assert final.wait(120) == 0, final.output()[-3000:]
    ids = bj.valid_ids(0, produced, BAD_EVERY if feed.bad else 0)
    bj.check_sinks(conn, ids, bad=produced - len(ids))
    rows = conn.execute(
        "SELECT source, partition, start_offset, end_offset FROM pgstream.batches "
        "WHERE job = %s ORDER BY 1, 2, 3", [bj.JOB],
    ).fetchall()
    last: dict[tuple[str, str], int] = {}
    for s, p, a, b in rows:
        assert last.get((s, p), a) == a, f"{s}/{p}: batch {a}..{b} does not follow {last}"
        last[(s, p)] = b
    verified = bj.pgstream(group.tmp, group.dsn, "verify", "brokerapp:app")
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_kafka_group_survives_a_kill_a_zombie_and_a_join_exactly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], kafka_bootstrap: str
) -> None:
    feed = KafkaFeed(kafka_bootstrap)
    _setup(tmp_path, pg_conn, feed)
    group = Group(tmp_path, pg_dsn)
    producer = Producer(feed, 2000)
    try:
        feed.add(list(range(2000)))
        producer.start()
        a, b, c = group.start(), group.start(), group.start()
        wait_for(lambda: group.owned_by_live([a, b, c], 6), 30, what="three owners")

        killed = time.monotonic()
        a.kill()
        wait_for(lambda: group.owned_by_live([b, c], 6), 15, interval=0.02,
                 what="b and c to own a's partitions")
        after_kill = time.monotonic() - killed

        b.stop()  # frozen past its lease: c takes everything over
        wait_for(lambda: group.owned_by_live([c], 6), LEASE + 15, what="c to own all")
        b.cont()  # a zombie: whatever batch it had in flight is refused by the epoch
        wait_for(lambda: any(m in b.output() for m in ("is stale", "was taken over",
                                                       "taken over during", "lost the lease")),
                 20, what="the resumed worker to find its leases taken over")

        d = group.start()
        joined = group.wait_joined(d)
        wait_for(lambda: group.owned_by_live([b, c, d], 6), 20, interval=0.02,
                 what="b, c and d to share the partitions")
        after_join = time.monotonic() - joined
        produced = producer.stop()
        for w in (b, c, d):
            assert w.terminate() == 0, w.output()[-3000:]
        _finish_and_check(group, feed, pg_conn, produced)
        print(f"\nkafka group: a's partitions owned again {after_kill:.2f}s after kill -9, "
              f"d owning its share {after_join:.2f}s after it joined; {produced} records")
    finally:
        producer._stop.set()
        group.cleanup()
        feed.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nats", "redis", "files", "table"])
def test_two_workers_kill_and_join_exactly(
    kind: str, tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any],
    request: pytest.FixtureRequest,
) -> None:
    feed = _feed(kind, tmp_path, pg_dsn, request)
    _setup(tmp_path, pg_conn, feed)
    group = Group(tmp_path, pg_dsn)
    producer = Producer(feed, 1000)
    try:
        feed.add(list(range(1000)))
        producer.start()
        a, b = group.start(), group.start()
        parts = feed.partitions
        wait_for(lambda: group.owned_by_live([a, b], parts), 30, what="two owners")
        a.kill()
        wait_for(lambda: group.owned_by_live([b], parts), 15, interval=0.02,
                 what="b to own a's partitions")
        c = group.start()
        wait_for(lambda: group.owned_by_live([b, c], parts), 20, interval=0.02,
                 what="b and c to share the partitions")
        time.sleep(0.5)
        produced = producer.stop()
        for w in (b, c):
            assert w.terminate() == 0, w.output()[-3000:]
        _finish_and_check(group, feed, pg_conn, produced)
    finally:
        producer._stop.set()
        group.cleanup()
        feed.close()


def _setup(tmp: Path, conn: psycopg.Connection[Any], feed: Feed) -> None:
    conn.execute(bj.DDL)
    streams = ", ".join(f"({name!r}, {expr})" for name, expr in feed.streams)
    (tmp / "brokerapp.py").write_text(textwrap.dedent(APP.format(job=bj.JOB, streams=streams)))

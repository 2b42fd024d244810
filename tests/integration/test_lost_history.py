"""Broker sources whose unread history is gone (trimmed, expired, deleted) under the opt-in
``on_lost`` reset policies, against the real Redis (127.0.0.1:6379) and NATS JetStream
(127.0.0.1:4222) servers, run as ``pgstream run`` subprocesses: the job goes on where the
policy says, records the skipped range in ``pgstream.skipped_ranges`` in the batch
transaction, ``verify`` reports it as "skipped by policy" (not lost) and ``status`` mentions
it. A recreated stream stops the job whatever the policy. (Kafka: tests/integration/
test_kafka_source.py; the tansu broker cannot delete records.)
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import broker_jobs as bj
import nats
import psycopg
import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.sources.redis_stream import offset_to_id

NATS = "nats://127.0.0.1:4222"


def skips(conn: psycopg.Connection[Any]) -> list[tuple[int, int, str, str]]:
    """The job's skipped ranges: (from, to, reason, policy)."""
    rows = conn.execute(
        "SELECT from_offset, to_offset, reason, policy FROM pgstream.skipped_ranges "
        "WHERE job = %s ORDER BY from_offset",
        [bj.JOB],
    ).fetchall()
    return [(int(a), int(b), r, p) for a, b, r, p in rows]


def verify_clean(tmp: Path, dsn: str) -> str:
    """``pgstream verify``: exit 0; its output."""
    done = bj.pgstream(tmp, dsn, "verify", "brokerapp:app")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"on_lost must be 'error', 'earliest' or 'latest'"):
        ps.RedisStreamSource("k", on_lost="skip")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"NatsSource\('S'\): on_lost must be"):
        ps.NatsSource("S", on_lost="oldest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"KafkaSource\('t'\): on_lost must be"):
        ps.KafkaSource("t", bootstrap_servers="x:1", on_lost="")  # type: ignore[arg-type]


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def rstream() -> Iterator[bj.RedisStream]:
    with bj.redis_stream() as s:
        yield s


def test_redis_trimmed_unread_entries_earliest_goes_on_at_the_first_entry(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], rstream: bj.RedisStream
) -> None:
    committed = bj.first_run(
        tmp_path, pg_dsn, pg_conn, rstream.source("earliest"), rstream.add, 100
    )
    offsets = rstream.add(bj.payloads(100, 100))
    rstream.client.xtrim(rstream.key, maxlen=50, approximate=False)  # 100..149 unread, gone
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    assert "skipped by on_lost='earliest'" in done.stderr
    bj.check_sinks(pg_conn, list(range(100)) + list(range(150, 200)), bad=0)
    assert skips(pg_conn) == [(committed, offsets[50], "retention", "earliest")]
    assert bj.committed(pg_conn) == offsets[-1] + 1
    # the ledger stays one chain: the batch after the skip starts at the old committed id
    chain = bj.ledger(pg_conn)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chain))
    status = bj.pgstream(tmp_path, pg_dsn, "status", "brokerapp:app")
    assert status.returncode == 0, status.stderr
    assert f"1 range(s), {offsets[50] - committed} offset(s) skipped by policy" in status.stdout
    # a rerun finds nothing new and records nothing twice
    assert bj.run_idle(tmp_path, pg_dsn).returncode == 0
    assert len(skips(pg_conn)) == 1
    # verify: what the stream still holds is checked, what it lost is not (and not "lost")
    out = verify_clean(tmp_path, pg_dsn)
    assert f"events/0 offsets [0, {committed}): the source no longer holds them" in out
    assert "per_user: records of events/0 before offset" in out
    assert f"skipped by policy: events/0 offsets [{committed}, {offsets[50]})" in out
    assert "verify brokers: clean;" in out and ", 50 records in" in out


def test_redis_deleted_unread_entries_earliest_is_exact_and_verify_says_skipped(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], rstream: bj.RedisStream
) -> None:
    committed = bj.first_run(
        tmp_path, pg_dsn, pg_conn, rstream.source("earliest"), rstream.add, 100
    )
    offsets = rstream.add(bj.payloads(100, 100))
    rstream.client.xdel(rstream.key, offset_to_id(offsets[30]), offset_to_id(offsets[31]))
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    kept = [i for i in range(200) if i not in (130, 131)]
    bj.check_sinks(pg_conn, kept, bad=0)
    assert skips(pg_conn) == [(committed, offsets[31] + 1, "deleted", "earliest")]
    out = verify_clean(tmp_path, pg_dsn)
    assert f"skipped by policy: events/0 offsets [{committed}, {offsets[31] + 1})" in out
    assert "verify brokers: clean;" in out and "1 range(s) skipped by policy" in out


def test_redis_latest_skips_to_the_end_and_reads_what_comes_after(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], rstream: bj.RedisStream
) -> None:
    committed = bj.first_run(tmp_path, pg_dsn, pg_conn, rstream.source("latest"), rstream.add, 100)
    offsets = rstream.add(bj.payloads(100, 100))
    rstream.client.xtrim(rstream.key, maxlen=50, approximate=False)
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, list(range(100)), bad=0)  # nothing of the stream's rest
    assert skips(pg_conn) == [(committed, offsets[-1] + 1, "retention", "latest")]
    assert bj.committed(pg_conn) == offsets[-1] + 1
    rstream.add(bj.payloads(200, 10))
    assert bj.run_idle(tmp_path, pg_dsn).returncode == 0
    bj.check_sinks(pg_conn, list(range(100)) + list(range(200, 210)), bad=0)


def test_redis_recreated_stream_stops_the_job_whatever_the_policy(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], rstream: bj.RedisStream
) -> None:
    bj.first_run(tmp_path, pg_dsn, pg_conn, rstream.source("earliest"), rstream.add, 20)
    rstream.client.delete(rstream.key)
    rstream.client.xadd(rstream.key, {"data": bj.event(99)}, id="1-1")
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert "beyond the stream's last id 1-1" in done.stderr and "recreated" in done.stderr
    assert "on_lost does not apply" in done.stderr
    assert skips(pg_conn) == []


def test_redis_recreated_stream_with_newer_ids_is_refused_not_skipped(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], rstream: bj.RedisStream
) -> None:
    bj.first_run(tmp_path, pg_dsn, pg_conn, rstream.source("earliest"), rstream.add, 20)
    rstream.client.delete(rstream.key)
    rstream.add(bj.payloads(20, 30))  # new ids (later milliseconds) past the committed id
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert "was never in this stream" in done.stderr and "recreated" in done.stderr
    assert skips(pg_conn) == []
    bj.check_sinks(pg_conn, list(range(20)), bad=0)


# -- NATS JetStream ------------------------------------------------------------------------------


class NatsStream:
    """A JetStream stream made for one test (subjects ``<name>.>``), deleted afterwards."""

    def __init__(self, name: str) -> None:
        self.name = name

    def source(self, on_lost: str) -> str:
        return f"ps.NatsSource({self.name!r}, servers={NATS!r}, on_lost={on_lost!r})"

    async def _run(self, action: str, *args: Any, **kwargs: Any) -> Any:
        nc = await nats.connect(NATS)
        try:
            js = nc.jetstream()
            if action == "publish":
                for data in args[0]:
                    await js.publish(f"{self.name}.e", data)
                return None
            if action == "limit":
                info = await js.stream_info(self.name)
                return await js.update_stream(info.config.evolve(**kwargs))
            return await getattr(js, action)(*args, **kwargs)
        finally:
            await nc.close()

    def call(self, action: str, *args: Any, **kwargs: Any) -> Any:
        return asyncio.run(self._run(action, *args, **kwargs))

    def publish(self, payloads: list[bytes]) -> None:
        """Publish ``payloads`` (each acknowledged by the stream)."""
        self.call("publish", payloads)


@pytest.fixture
def nstream() -> Iterator[NatsStream]:
    s = NatsStream("PGSLOST_" + uuid.uuid4().hex[:10].upper())
    s.call("add_stream", name=s.name, subjects=[f"{s.name}.>"])
    try:
        yield s
    finally:
        s.call("delete_stream", s.name)


def test_nats_max_msgs_earliest_goes_on_at_the_first_retained_message(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], nstream: NatsStream
) -> None:
    bj.first_run(tmp_path, pg_dsn, pg_conn, nstream.source("earliest"), nstream.publish, 100)
    assert bj.committed(pg_conn) == 101
    nstream.call("limit", max_msgs=50)
    nstream.call("publish", bj.payloads(100, 100))  # sequences 101..200; 101..150 drop out
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, list(range(100)) + list(range(150, 200)), bad=0)
    assert skips(pg_conn) == [(101, 151, "retention", "earliest")]
    assert bj.committed(pg_conn) == 201
    out = verify_clean(tmp_path, pg_dsn)
    assert "events/0 offsets [0, 101): the source no longer holds them" in out
    assert "skipped by policy: events/0 offsets [101, 151)" in out


def test_nats_deleted_messages_inside_a_range_earliest_and_verify(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], nstream: NatsStream
) -> None:
    bj.setup(tmp_path, pg_conn, nstream.source("earliest"))
    nstream.call("publish", bj.payloads(0, 60))
    for seq in (20, 21, 40):
        nstream.call("delete_msg", nstream.name, seq)
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    # sequence s holds event s - 1
    bj.check_sinks(pg_conn, [i for i in range(60) if i + 1 not in (20, 21, 40)], bad=0)
    assert skips(pg_conn) == [(20, 22, "deleted", "earliest"), (40, 41, "deleted", "earliest")]
    out = verify_clean(tmp_path, pg_dsn)
    assert "skipped by policy: events/0 offsets [20, 22)" in out
    assert "2 range(s) skipped by policy" in out


def test_nats_latest_skips_to_the_end(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], nstream: NatsStream
) -> None:
    bj.first_run(tmp_path, pg_dsn, pg_conn, nstream.source("latest"), nstream.publish, 30)
    nstream.call("publish", bj.payloads(30, 30))  # sequences 31..60
    nstream.call("purge_stream", nstream.name)
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    assert skips(pg_conn) == [(31, 61, "retention", "latest")]
    nstream.call("publish", bj.payloads(60, 5))
    assert bj.run_idle(tmp_path, pg_dsn).returncode == 0
    bj.check_sinks(pg_conn, list(range(30)) + list(range(60, 65)), bad=0)
    assert bj.committed(pg_conn) == 66


def test_nats_default_policy_still_stops_with_the_fix_named(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], nstream: NatsStream
) -> None:
    bj.first_run(tmp_path, pg_dsn, pg_conn, nstream.source("error"), nstream.publish, 10)
    nstream.call("publish", bj.payloads(10, 10))
    nstream.call("purge_stream", nstream.name)
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert "committed sequence 11 are gone" in done.stderr
    assert "on_lost='earliest' or 'latest'" in done.stderr
    assert skips(pg_conn) == []


def test_nats_recreated_stream_grown_past_the_committed_sequence_is_refused(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], nstream: NatsStream
) -> None:
    bj.first_run(tmp_path, pg_dsn, pg_conn, nstream.source("earliest"), nstream.publish, 10)
    assert bj.committed(pg_conn) == 11
    stored = pg_conn.execute("SELECT source_instance FROM pgstream.partitions").fetchone()
    assert stored is not None and str(stored[0]).startswith("stream created ")
    nstream.call("delete_stream", nstream.name)
    nstream.call("add_stream", name=nstream.name, subjects=[f"{nstream.name}.>"])
    nstream.call("publish", bj.payloads(100, 20))  # sequences 1..20: past 11
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert "the stream was recreated: it is now stream created" in done.stderr, done.stderr
    assert "committed offset 11 belongs to" in done.stderr
    bj.check_sinks(pg_conn, list(range(10)), bad=0)
    # the fix the error names: start the stream over (its instance is forgotten too)
    reset = bj.pgstream(
        tmp_path, pg_dsn, "job", "reset", "brokerapp:app", "--stream", "events",
        "--delete-outputs", "--yes",
    )
    assert reset.returncode == 0, reset.stdout + reset.stderr
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    ids = pg_conn.execute("SELECT id FROM facts ORDER BY id").fetchall()
    assert [i for (i,) in ids] == list(range(100, 120))
    now = pg_conn.execute("SELECT source_instance FROM pgstream.partitions").fetchone()
    assert now is not None and now[0] != stored[0] and skips(pg_conn) == []

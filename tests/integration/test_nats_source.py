"""ps.NatsSource against the local NATS JetStream server (127.0.0.1:4222), run as ``pgstream
run`` subprocesses: exactly once across SIGKILL, increments, dead letters, and the loud error
when messages the job has not read expired or were deleted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import broker_jobs as bj
import nats
import psycopg
import pytest

import pgstream as ps
from pgstream.sources import OpenContext, SourceError

SERVER = "nats://127.0.0.1:4222"


class Stream:
    """A JetStream stream made for one test (subjects ``<name>.>``), deleted afterwards."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = f"ps.NatsSource({name!r}, servers={SERVER!r})"

    async def _js(self, action: str, *args: Any) -> Any:
        nc = await nats.connect(SERVER)
        try:
            js = nc.jetstream()
            if action == "publish":
                for data in args[0]:
                    await nc.publish(f"{self.name}.e", data)
                await nc.flush()
                return None
            return await getattr(js, action)(*args)
        finally:
            await nc.close()

    def call(self, action: str, *args: Any) -> Any:
        return asyncio.run(self._js(action, *args))

    def publish(self, payloads: list[bytes]) -> None:
        """Publish ``payloads`` and wait until the stream holds them all."""
        before = self.last()
        self.call("publish", payloads)
        for _ in range(200):
            if self.last() >= before + len(payloads):
                return
            asyncio.run(asyncio.sleep(0.05))
        raise AssertionError(f"stream {self.name} did not receive {len(payloads)} messages")

    def last(self) -> int:
        return int(self.call("stream_info", self.name).state.last_seq)


@pytest.fixture
def stream() -> Iterator[Stream]:
    s = Stream("PGSTEST_" + uuid.uuid4().hex[:10].upper())
    asyncio.run(_add(s.name))
    try:
        yield s
    finally:
        s.call("delete_stream", s.name)


async def _update(name: str, **config: Any) -> None:
    nc = await nats.connect(SERVER)
    try:
        js = nc.jetstream()
        info = await js.stream_info(name)
        await js.update_stream(info.config.evolve(**config))
    finally:
        await nc.close()


async def _add(name: str) -> None:
    nc = await nats.connect(SERVER)
    try:
        await nc.jetstream().add_stream(name=name, subjects=[f"{name}.>"])
    finally:
        await nc.close()


def test_exactly_once_with_dead_letters_then_only_new_messages(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: Stream
) -> None:
    bj.setup(tmp_path, pg_conn, stream.source)
    stream.publish(bj.payloads(0, 2000, bad_every=100))
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, bj.valid_ids(0, 2000, 100), bad=20)
    assert bj.committed(pg_conn) == 2001  # sequences 1 .. 2000
    verified = bj.pgstream(tmp_path, pg_dsn, "verify", "brokerapp:app")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    batches = len(bj.ledger(pg_conn))
    stream.publish(bj.payloads(2000, 500))
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, bj.valid_ids(0, 2000, 100) + list(range(2000, 2500)), bad=20)
    new = bj.ledger(pg_conn)[batches:]
    assert new[0][0] == 2001 and new[-1][1] == 2501  # the second run read only the new ones


def test_sigkill_mid_run_and_rerun_is_exact(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: Stream
) -> None:
    bj.setup(tmp_path, pg_conn, stream.source)
    stream.publish(bj.payloads(0, 3000, bad_every=250))
    offset = bj.kill_mid_run(tmp_path, pg_dsn, pg_conn, {"DELAY": "0.002", "BATCH": "100"})
    assert 1 < offset < 3001
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, bj.valid_ids(0, 3000, 250), bad=12)
    assert bj.committed(pg_conn) == 3001


@pytest.mark.parametrize("how", ["max_age", "purge"])
def test_expired_messages_past_the_committed_sequence_fail_loudly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: Stream, how: str
) -> None:
    bj.setup(tmp_path, pg_conn, stream.source)
    stream.publish(bj.payloads(0, 100))
    assert bj.run_idle(tmp_path, pg_dsn).returncode == 0
    stream.publish(bj.payloads(100, 100))
    if how == "purge":
        stream.call("purge_stream", stream.name)  # sequences 101 .. 200 gone, unread
    else:  # they expire
        asyncio.run(_update(stream.name, max_age=0.5, duplicate_window=0.5))
        time.sleep(1.5)
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert f"NATS stream {stream.name!r}" in done.stderr, done.stderr
    assert "committed sequence 101" in done.stderr and "first sequence is now 201" in done.stderr
    bj.check_sinks(pg_conn, list(range(100)), bad=0)


def test_deleted_message_inside_a_range_fails_loudly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: Stream
) -> None:
    bj.setup(tmp_path, pg_conn, stream.source)
    stream.publish(bj.payloads(0, 50))
    stream.call("delete_msg", stream.name, 20)
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert f"{stream.name!r}" in done.stderr and "sequences 20..20 are missing" in done.stderr
    assert bj.committed(pg_conn) in (None, 1)  # nothing past the hole


def test_missing_stream_and_unreachable_server_are_clear_errors(
    pg_conn: psycopg.Connection[Any], stream: Stream
) -> None:
    with pytest.raises(SourceError, match=r"'NOPE_\w+' on nats://127\.0\.0\.1:4222 does not exist"):
        ps.NatsSource("NOPE_" + stream.name, servers=SERVER).validate(pg_conn)
    unreachable = ps.NatsSource(stream.name, servers="nats://127.0.0.1:1", connect_timeout=1)
    with pytest.raises(SourceError, match=r"cannot reach the NATS server nats://127\.0\.0\.1:1"):
        unreachable.validate(pg_conn)
    source = ps.NatsSource(stream.name, servers=SERVER)
    assert source.identity() == f"nats {SERVER} stream {stream.name}"


def test_a_time_maps_to_the_first_message_stored_at_or_after_it(stream: Stream) -> None:
    stream.publish(bj.payloads(0, 20))  # sequences 1 .. 20
    time.sleep(0.05)
    when = datetime.now(timezone.utc)  # the server's clock is this machine's
    time.sleep(0.05)
    stream.publish(bj.payloads(20, 20))  # 21 .. 40
    source = ps.NatsSource(stream.name, servers=SERVER)
    ctx = OpenContext("")
    assert source.offset_at("0", when, ctx) == 21
    assert source.offset_at("0", when - timedelta(hours=1), ctx) == 1
    assert source.offset_at("0", when + timedelta(hours=1), ctx) == 41  # the stream's end
    consumers = stream.call("consumers_info", stream.name)
    assert consumers == []  # the consumers it positioned are gone

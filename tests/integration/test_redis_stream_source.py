"""ps.RedisStreamSource against the local Redis server (127.0.0.1:6379), run as ``pgstream
run`` subprocesses: exactly once across SIGKILL, increments, dead letters, and the loud error
when entries the job has not read were trimmed; the id <-> offset mapping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import broker_jobs as bj
import psycopg
import pytest

import pgstream as ps
from pgstream.sources import OpenContext, SourceError
from pgstream.sources.redis_stream import id_to_offset, offset_to_id

URL = bj.REDIS


@pytest.fixture
def stream() -> Iterator[bj.RedisStream]:
    with bj.redis_stream() as s:
        yield s


def test_exactly_once_with_dead_letters_then_only_new_entries(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: bj.RedisStream
) -> None:
    bj.setup(tmp_path, pg_conn, stream.source())
    offsets = stream.add(bj.payloads(0, 2000, bad_every=100))
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, bj.valid_ids(0, 2000, 100), bad=20)
    assert bj.committed(pg_conn) == offsets[-1] + 1
    verified = bj.pgstream(tmp_path, pg_dsn, "verify", "brokerapp:app")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    batches = len(bj.ledger(pg_conn))
    more = stream.add(bj.payloads(2000, 500))
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, bj.valid_ids(0, 2000, 100) + list(range(2000, 2500)), bad=20)
    new = bj.ledger(pg_conn)[batches:]
    assert new[0][0] == offsets[-1] + 1 and new[-1][1] == more[-1] + 1


def test_sigkill_mid_run_and_rerun_is_exact(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: bj.RedisStream
) -> None:
    bj.setup(tmp_path, pg_conn, stream.source())
    offsets = stream.add(bj.payloads(0, 3000, bad_every=250))
    offset = bj.kill_mid_run(tmp_path, pg_dsn, pg_conn, {"DELAY": "0.002", "BATCH": "100"})
    assert 0 < offset <= offsets[-1]
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode == 0, done.stderr
    bj.check_sinks(pg_conn, bj.valid_ids(0, 3000, 250), bad=12)
    assert bj.committed(pg_conn) == offsets[-1] + 1


def test_trimmed_entries_past_the_committed_id_fail_loudly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: bj.RedisStream
) -> None:
    committed = bj.first_run(tmp_path, pg_dsn, pg_conn, stream.source(), stream.add, 100)
    # trimming entries the job has read is fine
    stream.client.xtrim(stream.key, maxlen=10, approximate=False)
    assert bj.run_idle(tmp_path, pg_dsn).returncode == 0
    # trimming unread ones is not
    offsets = stream.add(bj.payloads(100, 100))
    stream.client.xtrim(stream.key, maxlen=50, approximate=False)
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert f"Redis stream {stream.key!r}" in done.stderr, done.stderr
    assert f"trimmed past the committed id {offset_to_id(committed)}" in done.stderr
    assert f"now starts at {offset_to_id(offsets[50])}" in done.stderr
    bj.check_sinks(pg_conn, list(range(100)), bad=0)


def test_deleted_entry_past_the_committed_id_fails_loudly(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], stream: bj.RedisStream
) -> None:
    committed = bj.first_run(tmp_path, pg_dsn, pg_conn, stream.source(), stream.add, 100)
    offsets = stream.add(bj.payloads(100, 100))
    stream.client.xdel(stream.key, offset_to_id(offsets[30]))
    done = bj.run_idle(tmp_path, pg_dsn)
    assert done.returncode != 0
    assert f"at or after the committed id {offset_to_id(committed)} were deleted" in done.stderr
    assert f"largest deleted id is {offset_to_id(offsets[30])}" in done.stderr
    bj.check_sinks(pg_conn, list(range(100)), bad=0)


def test_fields_as_the_record_and_entries_without_the_field(
    pg_conn: psycopg.Connection[Any], stream: bj.RedisStream
) -> None:
    first = stream.client.xadd(stream.key, {"user": "ann", "amount": "5"})
    stream.client.xadd(stream.key, {"data": b'{"id": 1}'})
    reader = ps.RedisStreamSource(stream.key, url=URL, field=None).open("0", OpenContext(""))
    try:
        records = reader.read(0, 10).records
    finally:
        reader.close()
    assert [r.value for r in records] == [{"user": "ann", "amount": "5"}, {"data": '{"id": 1}'}]
    reader = ps.RedisStreamSource(stream.key, url=URL).open("0", OpenContext(""))
    try:
        result = reader.read(0, 10)
        assert reader.head() == result.end
    finally:
        reader.close()
    missing, good = result.records
    assert missing.offset == id_to_offset(first) and missing.value is None
    assert missing.error == f"entry at offset {missing.offset} has no field 'data'"
    assert good.value == {"id": 1}


def test_id_offset_mapping_keeps_order_and_refuses_big_sequences() -> None:
    ids = ["0-1", "0-1048575", "1-0", "1700000000000-3", "1700000000001-0"]
    offsets = [id_to_offset(i) for i in ids]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(ids)
    assert [offset_to_id(o) for o in offsets] == ids
    assert id_to_offset(b"1700000000000-3") == 1700000000000 * 2**20 + 3
    with pytest.raises(SourceError, match="sequence number above 1048575"):
        id_to_offset("5-1048576")


def test_missing_stream_and_unreachable_server_are_clear_errors(
    pg_conn: psycopg.Connection[Any], stream: bj.RedisStream
) -> None:
    with pytest.raises(SourceError, match=r"'pgstest:\w+' on redis://127\.0\.0\.1:6379 does not"):
        ps.RedisStreamSource(stream.key, url=URL).validate(pg_conn)
    unreachable = ps.RedisStreamSource(stream.key, url="redis://127.0.0.1:1", connect_timeout=1)
    with pytest.raises(SourceError, match=r"cannot reach the Redis server redis://127\.0\.0\.1:1"):
        unreachable.validate(pg_conn)
    secret = ps.RedisStreamSource("k", url="redis://u:pw@127.0.0.1:6379/0")
    assert secret.identity() == "redis redis://u:***@127.0.0.1:6379/0 stream k"

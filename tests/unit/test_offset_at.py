"""Mapping a time to an offset without a server: epoch milliseconds rounded up, Redis ids
(``ms-seq``) as the offsets of the first entry at or after a time, and sources without record
times saying so (``pgstream rewind --to-time`` then reads the ledger)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pgstream as ps
from pgstream.sources import OpenContext
from pgstream.sources.base import epoch_ms
from pgstream.sources.redis_stream import id_to_offset

UTC = timezone.utc
T0 = datetime(2026, 12, 7, 21, 30, tzinfo=UTC)
T0_MS = 1_796_679_000_000


def test_epoch_ms_rounds_up_to_the_next_whole_millisecond() -> None:
    assert epoch_ms(T0) == T0_MS
    assert epoch_ms(T0 + timedelta(microseconds=1)) == T0_MS + 1
    assert epoch_ms(T0 + timedelta(microseconds=999)) == T0_MS + 1
    assert epoch_ms(T0 + timedelta(microseconds=1000)) == T0_MS + 1
    assert epoch_ms(T0 - timedelta(microseconds=1)) == T0_MS
    other_zone = T0.astimezone(timezone(timedelta(hours=-5)))
    assert epoch_ms(other_zone) == T0_MS


def test_a_redis_time_is_the_offset_of_the_first_id_of_its_millisecond() -> None:
    source = ps.RedisStreamSource("k")
    ctx = OpenContext("")
    at = source.offset_at("0", T0, ctx)
    assert at == id_to_offset(f"{T0_MS}-0")
    # entries of the millisecond before are below it, entries of that millisecond at or above
    assert id_to_offset(f"{T0_MS - 1}-{2**20 - 1}") < at <= id_to_offset(f"{T0_MS}-5")
    later = source.offset_at("0", T0 + timedelta(microseconds=1), ctx)
    assert later == id_to_offset(f"{T0_MS + 1}-0")
    assert source.offset_at("0", datetime(1960, 1, 1, tzinfo=UTC), ctx) == 0


def test_sources_without_record_times_cannot_map_a_time(tmp_path: Path) -> None:
    ctx = OpenContext("")
    assert ps.FileSource(str(tmp_path / "x.jsonl")).offset_at("0", T0, ctx) is None
    assert ps.TableSource("public.orders", offset_column="id").offset_at("0", T0, ctx) is None

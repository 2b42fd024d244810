"""The broker sources without their optional packages: ``import pgstream`` works, and using
the source names the extra to install; bad options are refused at construction."""

from __future__ import annotations

import sys

import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.sources import OpenContext


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigError, match=r"pip install 'pgstream-engine\[nats\]'"):
        ps.NatsSource("ORDERS").open("0", OpenContext(""))
    with pytest.raises(ConfigError, match=r"pip install 'pgstream-engine\[redis\]'"):
        ps.RedisStreamSource("orders").open("0", OpenContext(""))


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="not a JetStream stream name"):
        ps.NatsSource("orders.eu")
    with pytest.raises(ConfigError, match="names no server"):
        ps.NatsSource("ORDERS", servers=[])
    with pytest.raises(ConfigError, match="stream key is empty"):
        ps.RedisStreamSource("")
    with pytest.raises(ConfigError, match="field= is empty"):
        ps.RedisStreamSource("orders", field="")

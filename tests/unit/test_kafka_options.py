"""KafkaSource options and the missing-extra error (no broker needed)."""

from __future__ import annotations

import sys

import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.sources.base import OpenContext


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="needs a topic name"):
        ps.KafkaSource("", bootstrap_servers="127.0.0.1:9092")
    with pytest.raises(ConfigError, match="needs bootstrap_servers"):
        ps.KafkaSource("orders", bootstrap_servers="")
    with pytest.raises(ConfigError, match="isolation_level must be"):
        ps.KafkaSource("orders", bootstrap_servers="b:9092", isolation_level="committed")
    with pytest.raises(ConfigError, match="value= must be a bytes -> dict function"):
        ps.KafkaSource("orders", bootstrap_servers="b:9092", value=b"x")  # type: ignore[arg-type]


def test_identity_names_the_servers_and_the_topic() -> None:
    source = ps.KafkaSource("orders", bootstrap_servers="k1:9092,k2:9092")
    assert source.identity() == "kafka k1:9092,k2:9092 topic orders"
    assert source.describe() == "kafka topic orders"
    assert source.initial_offset("3") == 0
    config = source.consumer_config()
    assert config["isolation.level"] == "read_committed"
    assert config["enable.auto.commit"] is False
    assert config["fetch.queue.backoff.ms"] < 1000


def test_a_missing_confluent_kafka_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    source = ps.KafkaSource("orders", bootstrap_servers="127.0.0.1:9092")
    with pytest.raises(ConfigError, match=r"pip install 'pgstream-engine\[kafka\]'"):
        source.open("0", OpenContext(""))

"""The pieces behind ``on_lost`` and broker outages, without servers: the skip log a reader
keeps until its batch commits, the policy check, and the outage back-off that gives up after
``max_retries``. (The behaviour against real servers: tests/integration/test_lost_history.py
and tests/faults/test_broker_outage.py.)"""

from __future__ import annotations

import time

import pytest

from pgstream.errors import ConfigError, SourceUnavailableError
from pgstream.runtime.outage import SourceOutage, UnreachableReader
from pgstream.sources.base import Skip, SkipLog, SourceUnreachable, check_on_lost


def test_a_skip_found_again_is_kept_once_and_forgotten_when_its_batch_commits() -> None:
    log = SkipLog()
    log.add(Skip(10, 20, "retention", "first is 20", "earliest"))
    log.add(Skip(10, 25, "retention", "found again on a re-read", "earliest"))
    log.add(Skip(40, 41, "deleted", "", "earliest"))
    assert [(s.start, s.end) for s in log.within(0, 40)] == [(10, 20)]
    assert [s.start for s in log.within(10, 100)] == [10, 40]
    assert log.within(11, 40) == []  # a skip belongs to the batch holding its start
    log.forget(below=40)
    assert [s.start for s in log.within(0, 100)] == [40]


def test_the_policy_must_be_one_of_three() -> None:
    assert check_on_lost("X", "latest") == "latest"
    with pytest.raises(ConfigError, match=r"X: on_lost must be 'error', 'earliest' or 'latest'"):
        check_on_lost("X", "newest")


def test_an_outage_backs_off_then_gives_up_with_one_clear_error() -> None:
    outage = SourceOutage(max_retries=2, where="orders/0")
    assert not outage.down and not outage.waiting()
    first = outage.failed(SourceUnreachable("cannot reach the broker"))
    assert outage.down and outage.waiting() and 0 < first <= 0.25
    second = outage.failed(SourceUnreachable("cannot reach the broker"))
    assert second > first - 0.1  # grows (up to jitter)
    with pytest.raises(SourceUnavailableError) as err:
        outage.failed(SourceUnreachable("cannot reach the broker\nmore lines"))
    text = str(err.value)
    assert text.startswith("orders/0: the source could not be reached for ")
    assert "(2 retries): cannot reach the broker" in text and "more lines" not in text
    assert "hint: start the broker" in text


def test_a_read_after_recovery_resets_the_count() -> None:
    outage = SourceOutage(max_retries=1, where="p")
    outage.failed(SourceUnreachable("down"))
    outage.retry_at = time.monotonic()  # the back-off ran out
    assert not outage.waiting()
    outage.recovered()
    assert not outage.down
    outage.failed(SourceUnreachable("down again"))  # counts from one again: no error


def test_a_reader_that_could_not_be_opened_raises_on_read() -> None:
    reader = UnreachableReader(SourceUnreachable("cannot reach the NATS server"))
    with pytest.raises(SourceUnreachable, match="cannot reach the NATS server"):
        reader.read(0, 10)

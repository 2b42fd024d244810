"""The exactly-once commit, without a database: retries are reported, an unknown COMMIT
outcome is resolved from the partition row (never sent again), a takeover is fenced."""

from __future__ import annotations

from typing import Any, cast

import psycopg
import pytest

from pgstream.config import Settings
from pgstream.errors import DatabaseError, LeaseLostError
from pgstream.runtime import committer as committer_module
from pgstream.runtime.checkpoint import BatchRange, CommitOutcomeUnknown, DuplicateOutputError
from pgstream.runtime.committer import BatchCommitter
from pgstream.runtime.connection import WorkerConnection
from pgstream.runtime.leases import LeaseManager
from pgstream.runtime.pipeline import BatchOutput, Pipeline

RANGE = BatchRange("job", "s", "0", 3, "w", 10, 10, 20, None, 1)


class FakeConn:
    broken = False
    closed = False


class FakeDb:
    def __init__(self) -> None:
        self.conn = FakeConn()
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


class FakeLeases:
    def __init__(self, row: tuple[int | None, int]) -> None:
        self.row = row

    def read_partition(self, conn: Any, source: str, partition: str) -> tuple[int | None, int]:
        return self.row


def _committer(
    outcomes: list[BaseException | int],
    monkeypatch: pytest.MonkeyPatch,
    row: tuple[int | None, int] = (10, 3),
) -> tuple[BatchCommitter, list[tuple[int, str]], list[dict[str, Any]], FakeDb]:
    calls: list[dict[str, Any]] = []

    def commit_batch(conn: Any, pipeline: Any, rng: Any, out: Any, **kw: Any) -> int:
        calls.append(kw)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(committer_module, "commit_batch", commit_batch)
    retries: list[tuple[int, str]] = []
    db = FakeDb()
    committer = BatchCommitter(
        cast(WorkerConnection, db),
        cast(LeaseManager, FakeLeases(row)),
        cast(Pipeline, None),
        Settings(max_retries=3),
        lambda attempt, exc: retries.append((attempt, type(exc).__name__)),
    )
    return committer, retries, calls, db


OUT = cast(BatchOutput, None)


def test_a_transient_error_retries_the_batch_and_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    committer, retries, calls, _ = _committer(
        [psycopg.errors.SerializationFailure("conflict"), 7], monkeypatch
    )
    assert committer.commit(OUT, RANGE) == 7
    assert retries == [(1, "SerializationFailure")]
    assert len(calls) == 2


def test_an_unknown_outcome_that_landed_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    committer, retries, calls, db = _committer(
        [CommitOutcomeUnknown("cut")], monkeypatch, row=(20, 3)
    )
    assert committer.commit(OUT, RANGE) == 0
    assert len(calls) == 1 and retries == [] and db.resets == 1


def test_an_unknown_outcome_that_did_not_land_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    committer, retries, calls, _ = _committer(
        [CommitOutcomeUnknown("cut"), 4], monkeypatch, row=(10, 3)
    )
    assert committer.commit(OUT, RANGE) == 4
    assert len(calls) == 2 and retries == [(1, "CommitOutcomeUnknown")]


def test_a_takeover_during_an_unknown_outcome_is_fenced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    committer, _, _, _ = _committer([CommitOutcomeUnknown("cut")], monkeypatch, row=(10, 4))
    with pytest.raises(LeaseLostError, match="taken over during an unknown commit"):
        committer.commit(OUT, RANGE)


def test_outputs_already_written_are_retried_with_duplicates_tolerated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    committer, _, calls, _ = _committer([DuplicateOutputError(), 2], monkeypatch)
    assert committer.commit(OUT, RANGE) == 2
    assert [c["tolerate_duplicates"] for c in calls] == [False, True]


def test_a_persistent_server_error_stops_with_its_sqlstate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    full = [psycopg.errors.DiskFull("no space left") for _ in range(3)]
    committer, retries, _, _ = _committer(list(full), monkeypatch)
    with pytest.raises(DatabaseError, match=r"s/0: batch \[10, 20\) failed 3 times in a row"):
        committer.commit(OUT, RANGE)
    assert [a for a, _ in retries] == [1, 2]


def test_a_lost_connection_goes_to_the_worker_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    lost = [psycopg.OperationalError("server closed the connection") for _ in range(3)]
    committer, _, _, _ = _committer(list(lost), monkeypatch)
    with pytest.raises(psycopg.OperationalError, match="server closed"):
        committer.commit(OUT, RANGE)

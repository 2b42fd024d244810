"""The batch retry loop: transient errors are retried with a growing back-off, anything else
propagates at once, and the last attempt's error is the one raised."""

from __future__ import annotations

import time

import psycopg
import pytest

from pgstream.runtime.retry import backoff, batch_attempts


def _run(errors: list[BaseException | None], attempts: int) -> tuple[int, list[int]]:
    """Run the loop over ``errors`` (one per attempt, None: succeed); return the attempts
    made and the attempt numbers reported as retried."""
    made = 0
    retried: list[int] = []
    for attempt in batch_attempts(attempts, lambda n, exc: retried.append(n)):
        with attempt:
            made += 1
            error = errors.pop(0)
            if error is not None:
                raise error
    return made, retried


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def test_a_transient_error_is_retried_until_an_attempt_succeeds() -> None:
    lost = psycopg.OperationalError("lost")
    assert _run([lost, lost, None], 5) == (3, [1, 2])


def test_any_other_error_propagates_at_once() -> None:
    with pytest.raises(ValueError, match="bug"):
        _run([ValueError("bug"), None], 5)


def test_the_last_attempts_error_is_raised() -> None:
    errors: list[BaseException | None] = [psycopg.OperationalError(f"try {i}") for i in (1, 2)]
    with pytest.raises(psycopg.OperationalError, match="try 2"):
        _run(errors, 2)


def test_at_least_one_attempt_is_made() -> None:
    assert _run([None], 0) == (1, [])


def test_the_back_off_doubles_up_to_its_cap_plus_jitter() -> None:
    for failures, base in ((1, 0.05), (2, 0.1), (3, 0.2), (12, 5.0)):
        assert base <= backoff(failures) <= base + 0.05
    assert 0.1 <= backoff(1, first=0.1) <= 0.2

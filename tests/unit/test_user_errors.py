"""An operator's error names the user's file and line (issue 11 item 8): in the dead letter's
error text and in the ``on_error="fail"`` message, on the fused kernel path and the general one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pgstream as ps
from pgstream.errors import RecordFailedError
from pgstream.runtime.pipeline import Pipeline
from pgstream.runtime.worker import build_sinks
from pgstream.sources.base import SourceRecord
from pgstream.sources.file import JsonLines
from pgstream.state.store import KeyedState
from pgstream.usercode import user_location

HERE = os.path.relpath(__file__)


def here(fn: Callable[..., Any], offset: int = 0) -> str:
    """``file:line`` of ``fn``'s first line (plus ``offset``)."""
    return f"{HERE}:{fn.__code__.co_firstlineno + offset}"


def divide(o: dict[str, Any]) -> dict[str, Any]:
    cents = o["amount"] * 100
    return {"per_unit": cents / o["units"]}


def by_region(o: dict[str, Any]) -> Any:
    return o["region"]


def positive(o: dict[str, Any]) -> bool:
    return bool(o["amount"] > 0)


def running(total: int, o: dict[str, Any]) -> int:
    return total + int(o["amount"] // o["units"])


def map_app(**kw: Any) -> ps.App:
    app = ps.App("loc", **kw)
    app.stream("s", ps.FileSource("unused.jsonl")).map(divide).to_table("t")
    return app


def filter_app() -> ps.App:
    app = ps.App("loc")
    app.stream("s", ps.FileSource("unused.jsonl")).filter(positive).map(
        lambda o: {"a": o["amount"]}
    ).to_table("t")
    return app


def key_app() -> ps.App:
    app = ps.App("loc")
    app.stream("s", ps.FileSource("unused.jsonl")).key_by(by_region, name="region").aggregate(
        n=ps.count()
    ).to_table("t")
    return app


def lambda_app() -> ps.App:
    app = ps.App("loc")
    stream = app.stream("s", ps.FileSource("unused.jsonl"))
    stream.map(lambda o: {"x": 1 // o["units"]}).to_table("t")  # the lambda's line
    return app


BAD = {"amount": 3, "units": 0}  # ZeroDivisionError in divide and in the lambda
NO_REGION = {"amount": 3, "units": 1}  # KeyError in by_region
NO_AMOUNT = {"units": 1}  # KeyError in positive


def lambda_line() -> str:
    [line] = [
        i
        for i, text in enumerate(Path(__file__).read_text().splitlines(), 1)
        if text.endswith("# the lambda" + "'s line")
    ]
    return f"{HERE}:{line} in <lambda>"


CASES: list[tuple[str, Callable[[], ps.App], dict[str, Any], Callable[[], str], str]] = [
    ("map", map_app, BAD, lambda: here(divide, 2) + " in divide", "ZeroDivisionError"),
    ("lambda", lambda_app, BAD, lambda_line, "ZeroDivisionError"),
    ("filter", filter_app, NO_AMOUNT, lambda: here(positive, 1) + " in positive", "KeyError"),
    ("key_by", key_app, NO_REGION, lambda: here(by_region, 1) + " in by_region", "KeyError"),
]


def pipeline(app: ps.App, kernel: bool) -> Pipeline:
    p = Pipeline(app, "s", "0", build_sinks(app), {})
    if not kernel:
        p._raw_kernel = p._records_kernel = None
    else:
        assert p._records_kernel is not None, "this app should take the kernel path"
    return p


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "general"])
@pytest.mark.parametrize(("name", "make_app", "record", "where", "kind"), CASES)
def test_dead_letter_error_names_the_users_file_and_line(
    name: str,
    make_app: Callable[[], ps.App],
    record: dict[str, Any],
    where: Callable[[], str],
    kind: str,
    kernel: bool,
) -> None:
    p = pipeline(make_app(), kernel)
    out = p.evaluate([SourceRecord(5, {"amount": 1, "units": 1, "region": "eu"}),
                      SourceRecord(9, record)])
    [dead] = out.dead
    assert dead.offset == 9
    assert dead.error.startswith(f"{kind}: ")
    assert dead.error.endswith(f" (at {where()})"), dead.error


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "general"])
def test_json_raw_kernel_keeps_the_location(kernel: bool) -> None:
    p = pipeline(map_app(), kernel)
    lines = [b'{"amount": 1, "units": 1}', b'{"amount": 1, "units": 0}']
    end = sum(len(x) + 1 for x in lines)
    out = p.evaluate_raw(JsonLines(lines, 0, end, end))
    [dead] = out.dead
    assert dead.error == f"ZeroDivisionError: division by zero (at {here(divide, 2)} in divide)"


def test_fold_error_names_the_fold_function() -> None:
    app = ps.App("loc")
    app.stream("s", ps.FileSource("unused.jsonl")).key_by("k").fold(
        0, running, name="running"
    ).to_table("t")
    p = Pipeline(app, "s", "0", build_sinks(app), {"running": KeyedState("loc", "running", "0")})
    out = p.evaluate([SourceRecord(1, {"k": "a", "amount": 4, "units": 0})])
    [dead] = out.dead
    assert dead.error == (
        f"ZeroDivisionError: integer division or modulo by zero (at {here(running, 1)} in running)"
    )


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "general"])
def test_on_error_fail_message_names_the_users_file_and_line(kernel: bool) -> None:
    p = pipeline(map_app(on_error="fail"), kernel)
    with pytest.raises(RecordFailedError) as err:
        p.evaluate([SourceRecord(3, BAD)])
    assert err.value.message == (
        "record at offset 3 of s/0 failed in to_table(t): ZeroDivisionError: division by zero "
        f"(at {here(divide, 2)} in divide)"
    )


def test_traceback_is_logged_at_info_once_per_place_then_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = pipeline(map_app(), kernel=True)
    with caplog.at_level(logging.DEBUG, logger="pgstream.pipeline"):
        p.evaluate([SourceRecord(i, BAD) for i in range(3)])
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]
    text = caplog.records[0].getMessage()
    assert "Traceback (most recent call last)" in text
    assert 'return {"per_unit": cents / o["units"]}' in text


def test_location_skips_pgstream_and_stdlib_frames() -> None:
    import json

    try:
        json.loads("{")  # raises inside the stdlib
    except ValueError as exc:
        where = user_location(exc)
    assert where is not None and where.startswith(f"{HERE}:")
    assert where.endswith("in test_location_skips_pgstream_and_stdlib_frames")

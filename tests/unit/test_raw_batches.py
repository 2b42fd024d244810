"""Undecoded payloads from a source other than a file (listed, non-contiguous offsets) go
through the same fused kernels as a file's lines, with the same outputs as the general loop."""

from __future__ import annotations

import json
from typing import Any

import pytest

import pgstream as ps
from pgstream.runtime.pipeline import Pipeline
from pgstream.runtime.worker import build_sinks
from pgstream.sources.raw import JsonPayloads, RawBatch, RawReader

OFFSETS = [100, 250, 251, 900, 1200, 5000, 5001]
PAYLOADS = [
    b'{"user": "a", "amount": 3}',
    b"{not json",
    b'{"user": "b", "amount": 0}',  # the map divides by it
    b"[1, 2]",
    b'{"user": "a", "amount": 5}',
    b"",
    b'{"user": "b", "amount": 2}',
]


def append_app() -> ps.App:
    app = ps.App("raw")
    app.stream("s", ps.FileSource("unused.jsonl")).map(
        lambda e: {"user": e["user"], "inverse": 1 / e["amount"]}
    ).to_table("facts")
    return app


def aggregate_app() -> ps.App:
    app = ps.App("raw")
    app.stream("s", ps.FileSource("unused.jsonl")).filter(
        lambda e: 1 / e["amount"] > 0
    ).key_by("user").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("totals")
    return app


def batch() -> JsonPayloads:
    return JsonPayloads(list(PAYLOADS), list(OFFSETS), start=100, end=5002, head=6000)


def evaluate(make_app: Any, kernel: bool) -> Any:
    p = Pipeline(make_app(), "s", "0", build_sinks(make_app()), {})
    if kernel:
        assert p._raw_kernel is not None
    else:
        p._raw_kernel = p._records_kernel = None
    out = p.evaluate_raw(batch())
    return out.records_in, out.slots, [(d.offset, d.payload, d.error, d.operator) for d in out.dead]


@pytest.mark.parametrize("make_app", [append_app, aggregate_app])
def test_kernel_on_listed_offsets_equals_the_general_loop(make_app: Any) -> None:
    assert evaluate(make_app, kernel=True) == evaluate(make_app, kernel=False)


def test_failures_carry_their_listed_offsets() -> None:
    records_in, slots, dead = evaluate(append_app, kernel=True)
    assert records_in == len(PAYLOADS)  # an empty message is a record (unlike a blank line)
    assert [(off, op) for off, _, _, op in dead] == [
        (250, "decode"), (251, "to_table(facts)"), (900, "decode"), (5000, "decode"),
    ]
    assert dead[0][2].startswith("message at offset 250 is not valid JSON")
    assert dead[2][2] == "message at offset 900 is an array, not a JSON object"
    assert dead[1][1] == b'{"user":"b","amount":0}'  # a failed operator keeps the value
    [rows] = slots[0].values()
    assert [row[-2] for row in rows] == [100, 1200, 5001]  # each row at its listed offset


def test_payloads_extend_only_where_they_continue() -> None:
    first = JsonPayloads([b"{}"], [7], start=5, end=8)
    first.extend(JsonPayloads([b"{}", b"{}"], [20, 31], start=8, end=32, head=40))
    assert (list(first.offsets()), first.end, first.head, len(first)) == ([7, 20, 31], 32, 40, 3)
    with pytest.raises(ValueError, match="do not continue"):
        first.extend(JsonPayloads([b"{}"], [50], start=33, end=51))


def test_records_decodes_every_payload_at_its_offset() -> None:
    recs = batch().records()
    assert [r.offset for r in recs] == OFFSETS
    assert recs[0].value == json.loads(PAYLOADS[0])


def test_a_reader_offering_read_raw_is_a_raw_reader() -> None:
    class MessageReader:
        def read_raw(self, start: int, max_records: int) -> RawBatch:
            return JsonPayloads([], [], start, start)

    assert isinstance(MessageReader(), RawReader)
    assert not isinstance(object(), RawReader)

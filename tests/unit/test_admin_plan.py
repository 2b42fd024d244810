"""Renaming a stream in a recorded plan (the plan contract): exactly the stream names."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from pgstream.errors import JobStateError
from pgstream.plan import fingerprint as plan_fingerprint
from pgstream.plan import rename_stream as rename_stream_in_plan

PLAN = {
    "streams": {"orders": {"source": "table:public.orders(id)"}, "clicks": {"source": "f"}},
    "sinks": [
        {"stream": "orders", "table": "facts", "kind": "append", "steps": ["orders"]},
        {"stream": "orders", "table": "last", "kind": "fold", "operator": "orders:fold:last"},
        {"stream": "orders", "table": "named", "kind": "fold", "operator": "orders:fold:x"},
        {"stream": "clicks", "table": "c", "kind": "fold", "operator": "clicks:fold:c"},
    ],
    "handlers": [{"stream": "orders", "name": "orders"}, {"stream": "clicks", "name": "h"}],
}


def test_rename_rewrites_keys_stream_values_and_default_fold_ids_only() -> None:
    out = rename_stream_in_plan(PLAN, "orders", "orders_v2")
    assert list(out["streams"]) == ["orders_v2", "clicks"]
    assert out["streams"]["orders_v2"] == PLAN["streams"]["orders"]  # type: ignore[index]
    assert [(s["stream"], s.get("operator")) for s in out["sinks"]] == [
        ("orders_v2", None),
        ("orders_v2", "orders_v2:fold:last"),
        ("orders_v2", "orders:fold:x"),  # a name given in code is not a default id
        ("clicks", "clicks:fold:c"),
    ]
    assert out["sinks"][0]["steps"] == ["orders"]  # other values are left alone
    assert out["handlers"] == [
        {"stream": "orders_v2", "name": "orders"},
        {"stream": "clicks", "name": "h"},
    ]
    assert PLAN["streams"].keys() == {"orders", "clicks"}  # type: ignore[attr-defined]


def test_rename_of_an_absent_stream_changes_nothing() -> None:
    assert rename_stream_in_plan(PLAN, "ghost", "x") == PLAN


def test_rename_onto_a_planned_stream_is_refused() -> None:
    with pytest.raises(JobStateError, match="already has both streams"):
        rename_stream_in_plan(PLAN, "orders", "clicks")


def test_fingerprint_is_the_contract_formula() -> None:
    expected = hashlib.sha256(orjson.dumps(PLAN, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert plan_fingerprint(PLAN) == expected
    assert plan_fingerprint(rename_stream_in_plan(PLAN, "orders", "o2")) != expected

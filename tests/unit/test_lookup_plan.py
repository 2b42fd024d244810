"""Lookup steps: argument checks, their place in the plan (and its fingerprint), and that an
unbound lookup is never compiled silently."""

from __future__ import annotations

import pytest

import pgstream as ps
from pgstream import plan as plans
from pgstream.errors import ConfigError
from pgstream.operators.lookup import BoundLookup, Lookup, LookupMissingError
from pgstream.operators.steps import compile_chain
from pgstream.sources.file import FileSource


def app_with(missing: str = "null", columns: tuple[str, ...] = ("country",)) -> ps.App:
    app = ps.App("x")
    app.stream("o", FileSource("o.jsonl")).lookup(
        "public.users", on={"user_id": "id"}, columns=list(columns), missing=missing
    ).to_table("facts")
    return app


def test_lookup_is_in_the_plan_and_its_fingerprint() -> None:
    steps = plans.describe(app_with())["sinks"][0]["steps"]
    assert steps == [
        {
            "op": "lookup",
            "table": "public.users",
            "on": {"user_id": "id"},
            "columns": ["country"],
            "missing": "null",
        }
    ]
    base = plans.fingerprint(plans.describe(app_with()))
    assert plans.fingerprint(plans.describe(app_with("drop"))) != base
    assert plans.fingerprint(plans.describe(app_with(columns=("country", "tier")))) != base
    assert plans.fingerprint(plans.describe(app_with())) == base


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"on": "", "columns": ["c"]}, "must name one key"),
        ({"on": {"a": "b", "c": "d"}, "columns": ["c"]}, "must name one key"),
        ({"on": "id", "columns": "country"}, "columns= must be"),
        ({"on": "id", "columns": []}, "columns= must be"),
        ({"on": "id", "columns": ["c"], "missing": "skip"}, "missing='skip'"),
    ],
)
def test_bad_arguments_are_refused_at_definition(kwargs: dict[str, object], words: str) -> None:
    stream = ps.App("x").stream("o", FileSource("o.jsonl"))
    with pytest.raises(ConfigError, match=words):
        stream.lookup("users", **kwargs)  # type: ignore[arg-type]


def test_bound_lookup_modes() -> None:
    for missing, want in [("null", [{"k": 1, "c": "a"}, {"k": 2, "c": None}]),
                          ("drop", [{"k": 1, "c": "a"}])]:
        bound = BoundLookup(Lookup.build("t", "k", ["c"], missing))
        bound.rows = {1: ("a",)}
        run = compile_chain(bound.steps())
        assert [o for r in ({"k": 1}, {"k": 2}) for o in run(r)] == want
    bound = BoundLookup(Lookup.build("t", "k", ["c"], "dead_letter"))
    run = compile_chain(bound.steps())
    with pytest.raises(LookupMissingError, match=r"'t': no row with k = 2"):
        run({"k": 2})
    with pytest.raises(LookupMissingError, match="record has no field 'k'"):
        run({"x": 2})


def test_an_unbound_lookup_is_not_compiled() -> None:
    with pytest.raises(TypeError, match="not bound"):
        compile_chain((Lookup.build("t", "k", ["c"], "null"),))

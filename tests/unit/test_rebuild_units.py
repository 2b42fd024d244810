"""Unit rules of ``pgstream rebuild``: shadow names, the bounded reader, the selection."""

from __future__ import annotations

import pytest
from memory_source import MemorySource

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.rebuild import BoundedReader, select
from pgstream.rebuild.shadow import MAX_IDENTIFIER, shadow_job, suffixed
from pgstream.sources.base import OpenContext


def test_suffixed_names_fit_postgres_identifiers() -> None:
    assert suffixed("totals", "__rebuild") == "totals__rebuild"
    long_a, long_b = "é" * 40 + "a", "é" * 40 + "b"
    a, b = suffixed(long_a, "__rebuild"), suffixed(long_b, "__rebuild")
    assert len(a.encode()) <= MAX_IDENTIFIER and len(b.encode()) <= MAX_IDENTIFIER
    assert a != b and a.endswith("__rebuild")
    a.encode().decode()  # whole characters only
    assert shadow_job("shop") == "shop~rebuild"


def test_the_bounded_reader_never_returns_the_bound_or_beyond() -> None:
    source = MemorySource("m", {"0": [{"i": i} for i in range(10)]})
    reader = BoundedReader(source.open("0", OpenContext("")), 6)
    first = reader.read(0, 4)
    assert [r.offset for r in first.records] == [0, 1, 2, 3] and first.end == 4
    rest = reader.read(4, 100)
    assert [r.offset for r in rest.records] == [4, 5] and rest.end == 6
    assert rest.head is not None and rest.head <= 6
    done = reader.read(6, 100)
    assert done.records == [] and done.end == 6
    assert reader.head() == 6


def _app(handler: bool = False) -> ps.App:
    source = MemorySource("m", {"0": []})
    app = ps.App("shop")
    orders = app.stream("orders", source)
    orders.to_table("facts")
    orders.key_by("user").aggregate(n=ps.count()).to_table("totals")
    if handler:

        @app.batch(orders)
        def audit(batch: ps.Batch) -> None:
            del batch

    return app


def test_selection_full_and_partial_streams() -> None:
    app = _app()
    whole = select(app, [])
    assert whole.tables == ("facts", "totals") and whole.full_streams == ("orders",)
    part = select(app, ["totals"])
    assert part.tables == ("totals",) and part.partial_streams == ("orders",)
    assert select(app, ["facts", "totals"]).full_streams == ("orders",)


def test_selection_refusals() -> None:
    with pytest.raises(ConfigError, match=r"@app\.batch handlers") as err:
        select(_app(handler=True), [])
    assert err.value.hint is not None and "--sink" in err.value.hint
    assert select(_app(handler=True), ["totals", "facts"]).full_streams == ()
    with pytest.raises(ConfigError, match="no sink 'nope'"):
        select(_app(), ["nope"])

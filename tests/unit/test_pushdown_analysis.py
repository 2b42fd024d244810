"""Which sink paths are pushed down into SQL, why the others stay in Python, and the SQL."""

from __future__ import annotations

from typing import Any

import pytest

import pgstream as ps
from pgstream.runtime.pushdown import NotPushable, analyze, explain_app, statement

TABLE = ps.TableSource("public.events")


def reason(build: Any, source: ps.Source = TABLE) -> str:
    app = ps.App("x")
    build(app.stream("s", source))
    with pytest.raises(NotPushable) as info:
        analyze(app.sinks[0], source)
    return str(info.value)


def test_what_keeps_a_path_in_python() -> None:
    def by_python_filter(s: Any) -> None:
        s.filter(lambda r: True).key_by("u").aggregate(n=ps.count()).to_table("t")

    assert reason(by_python_filter) == "step 1 (filter) is a Python function"
    assert "step 2 (flat_map)" in reason(
        lambda s: s.filter(ps.col("a") > 1).flat_map(lambda r: [r]).to_table("t")
    )
    assert "not a TableSource" in reason(
        lambda s: s.key_by("u").aggregate(n=ps.count()).to_table("t"), ps.FileSource("/x")
    )
    assert "key_by is a Python function" in reason(
        lambda s: s.key_by(lambda r: 1, name="k").aggregate(n=ps.count()).to_table("t")
    )
    assert "time is a Python function" in reason(
        lambda s: s.key_by("u").window(ps.tumbling(seconds=5), time=lambda r: 0)
        .aggregate(n=ps.count()).to_table("t")
    )
    assert "sum(fn)" in reason(
        lambda s: s.key_by("u").aggregate(t=ps.sum(lambda r: 1)).to_table("t")
    )
    assert "fold keeps per-key state" in reason(
        lambda s: s.key_by("u").fold(0, lambda a, r: a).to_table("t")
    )
    assert "step 2 (filter) reads column 'amount', which its records do not have" in reason(
        lambda s: s.select(id=ps.col("id")).filter(ps.col("amount") > 0).to_table("t")
    )
    assert "key_by reads column 'u', which its records do not have" in reason(
        lambda s: s.key_by("u").aggregate(n=ps.count()).to_table("t"),
        ps.TableSource("events", columns=["id", "a"]),
    )
    assert "without select()" in reason(lambda s: s.filter(ps.col("a") > 0).to_table("t"))


def test_statements() -> None:
    app = ps.App("x")
    s = app.stream("s", ps.TableSource("public.events", columns=["id", "a"]))
    s.filter(ps.col("a") > 0).to_table("raw")  # whole rows of a source with columns=
    s.select(id="id", double=ps.col("a") * 2).filter(ps.col("double") < 10).key_by(
        "double"
    ).aggregate(n=ps.count(), m=ps.avg("id")).to_table("agg")
    raw = statement(analyze(app.sinks[0], app.sources["s"]), app.sources["s"], "0",  # type: ignore[arg-type]
                    ps_ident("raw")).as_string(None)
    assert raw.startswith('INSERT INTO "raw" AS "t" ("id", "a", "_source", "_partition", ')
    assert "(\"a\" > 0::bigint)" in raw and "ON CONFLICT" not in raw
    agg = statement(analyze(app.sinks[1], app.sources["s"]), app.sources["s"], "0",  # type: ignore[arg-type]
                    ps_ident("agg")).as_string(None)
    # the select's expressions are inlined where later steps read its columns
    assert '(("a" * 2::bigint) < 10::bigint)' in agg
    assert "GROUP BY 1 ORDER BY 1 ON CONFLICT (\"double\") DO UPDATE SET" in agg
    assert 'sum("id")::numeric / NULLIF(count("id"), 0)' in agg
    assert [r.runs for r in explain_app(app)] == ["SQL", "SQL"]


def test_split_sources_filter_their_partition() -> None:
    src = ps.TableSource("events", partitions=4, partition_by="u")
    app = ps.App("x")
    app.stream("s", src).key_by("u").aggregate(n=ps.count()).to_table("t")
    text = statement(analyze(app.sinks[0], src), src, "3", ps_ident("t")).as_string(None)
    assert "hashtextextended(coalesce(\"u\"::text, ''), 0), 4)) = 3" in text


def test_pushdown_off_keeps_every_path_in_python() -> None:
    app = ps.App("x", pushdown=False)
    app.stream("s", TABLE).key_by("u").aggregate(n=ps.count()).to_table("t")
    assert [(r.runs, r.why) for r in explain_app(app)] == [("Python", "pushdown is off")]


def ps_ident(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(name)


def test_event_time_windows_stay_in_python() -> None:
    """Watermarks, late records and final rows are kept in Python: a window with grace,
    emit="final", hopping windows or epoch milliseconds is never pushed down."""
    windows: list[Any] = [
        lambda k: k.window(ps.tumbling(seconds=60), time="ts", grace=10),
        lambda k: k.window(ps.tumbling(seconds=60), time="ts", emit="final"),
        lambda k: k.window(ps.hopping(seconds=60, every=10), time="ts"),
        lambda k: k.window(ps.tumbling(seconds=60), time="ts", time_unit="ms"),
    ]
    for window in windows:
        why = reason(lambda s, w=window: w(s.key_by("u")).aggregate(n=ps.count()).to_table("t"))
        assert "kept in Python" in why
    app = ps.App("x")
    app.stream("s", TABLE).key_by("u").window(ps.tumbling(seconds=60), time="ts").aggregate(
        n=ps.count()
    ).to_table("t")
    analyze(app.sinks[0], TABLE)  # a plain tumbling window still is pushed down

"""A fold whose key's records may arrive through several partitions goes through a
repartition (a second stream reading ``pgstream.repartition``); what a repartition does not
cover (a windowed fold) is refused at definition."""

from __future__ import annotations

from pathlib import Path

import pytest

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.sources.repartition import RepartitionSource


def _fold(stream: ps.Stream, key: str = "user_id") -> None:
    stream.key_by(key).fold(0, lambda n, _r: n + 1).to_table(f"counts_{stream.source}")


def test_fold_over_one_file_or_one_table_is_allowed(tmp_path: Path) -> None:
    app = ps.App("one")
    _fold(app.stream("f", ps.FileSource(str(tmp_path / "a.jsonl"))))
    _fold(app.stream("t", ps.TableSource("orders")))
    assert [s.kind for s in app.sinks] == ["fold", "fold"]


@pytest.mark.parametrize(
    "source",
    [
        lambda tmp: ps.FileSource(str(tmp / "*.jsonl")),
        lambda tmp: ps.FileSource(str(tmp)),
        lambda tmp: ps.TableSource("orders", partitions=4, partition_by="region"),
        lambda tmp: ps.KafkaSource("orders", bootstrap_servers="127.0.0.1:9"),
    ],
    ids=["glob", "directory", "split-table-other-key", "kafka"],
)
def test_fold_over_several_partitions_is_repartitioned(tmp_path: Path, source: object) -> None:
    app = ps.App("many")
    stream = app.stream("orders", source(tmp_path))  # type: ignore[operator]
    _fold(stream.filter(lambda r: r["amount"] > 0))
    (spec,) = app.sinks
    rep = spec.repartition
    assert rep is not None and rep.upstream == "orders" and len(rep.steps) == 1
    assert spec.stream == rep.stream == "orders:fold:counts_orders:repartition"
    assert spec.steps == ()  # the filter runs in the first stage
    second = app.sources[rep.stream]
    assert isinstance(second, RepartitionSource) and second.upstream == "orders"
    assert rep.partitions == (4 if isinstance(app.sources["orders"], ps.TableSource) else 8)


def test_fold_over_a_windowed_key_of_several_partitions_is_refused(tmp_path: Path) -> None:
    app = ps.App("many")
    stream = app.stream("orders", ps.FileSource(str(tmp_path / "*.jsonl")))
    with pytest.raises(ConfigError) as err:
        stream.key_by("user_id").window(ps.tumbling(seconds=60), time="ts").fold(
            0, lambda n, _r: n + 1
        ).to_table("w")
    assert "has several partitions" in err.value.message
    assert err.value.hint is not None and "aggregate()" in err.value.hint
    assert app.sinks == []


def test_repartition_partitions_argument(tmp_path: Path) -> None:
    app = ps.App("many")
    stream = app.stream("orders", ps.FileSource(str(tmp_path / "*.jsonl")))
    stream.key_by("user_id").fold(0, lambda n, _r: n + 1, partitions=3).to_table("a")
    assert app.sinks[0].repartition is not None and app.sinks[0].repartition.partitions == 3
    with pytest.raises(ConfigError, match="int >= 1"):
        stream.key_by("user_id").fold(0, lambda n, _r: n + 1, partitions=0)
    one = app.stream("one", ps.FileSource(str(tmp_path / "a.jsonl")))
    with pytest.raises(ConfigError, match="needs none"):
        one.key_by("user_id").fold(0, lambda n, _r: n + 1, partitions=3).to_table("b")


def test_fold_keyed_by_the_split_column_is_allowed_after_filters_only() -> None:
    app = ps.App("split")
    stream = app.stream("orders", ps.TableSource("orders", partitions=4, partition_by="user_id"))
    _fold(stream.filter(lambda r: r["amount"] > 0))
    assert app.sinks[0].repartition is None
    # a map may change what user_id means: repartitioned
    stream.map(lambda r: {**r, "user_id": r["other"]}).key_by("user_id").fold(
        0, lambda n, _r: n + 1
    ).to_table("counts_mapped")
    assert len(app.sinks) == 2 and app.sinks[1].repartition is not None
    with pytest.raises(ConfigError):  # a window folds per (key, window): still one key field
        stream.key_by("user_id").window(ps.tumbling(seconds=60), time="ts").fold(
            0, lambda n, _r: n + 1
        ).to_table("w")


def test_aggregates_over_several_partitions_stay_allowed(tmp_path: Path) -> None:
    app = ps.App("agg")
    stream = app.stream("orders", ps.FileSource(str(tmp_path / "*.jsonl")))
    stream.key_by("user_id").aggregate(n=ps.count()).to_table("totals")
    assert [s.kind for s in app.sinks] == ["aggregate"]

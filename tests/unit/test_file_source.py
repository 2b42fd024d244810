"""FileSource: byte offsets, partial lines, bad data, truncation."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from pgstream.sources.base import OpenContext, SourceError, SourceRecord
from pgstream.sources.file import FileReader, FileSource


def _reader(path: Path) -> FileReader:
    return FileSource(path).open("0", OpenContext(""))


def _read_all(
    reader: FileReader, start: int = 0, max_records: int = 1000
) -> tuple[list[SourceRecord], int]:
    """Read until nothing new is returned; return all records and the final end."""
    out: list[SourceRecord] = []
    while True:
        res = reader.read(start, max_records)
        out.extend(res.records)
        if res.end == start:
            return out, start
        start = res.end


def test_source_basics(tmp_path: Path) -> None:
    p = tmp_path / "orders.jsonl"
    p.write_bytes(b"")
    src = FileSource(p)
    assert src.kind == "file"
    assert src.partitions(None) == ["0"]  # type: ignore[arg-type]
    assert src.initial_offset("0") == 0
    assert src.describe() == f"file {p}"
    assert FileSource("orders.jsonl").describe() == "file orders.jsonl"
    assert FileSource(p, name="orders").describe() == "file orders"
    src.validate(None)  # type: ignore[arg-type]


def test_offsets_are_line_start_bytes(tmp_path: Path) -> None:
    lines = [b'{"a":1}', b'{"a":22,"b":"x"}', b'{"a":333}']
    p = tmp_path / "f.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    r = _reader(p)
    res = r.read(0, 100)
    assert [x.offset for x in res.records] == [0, 8, 25]
    assert [x.value for x in res.records] == [{"a": 1}, {"a": 22, "b": "x"}, {"a": 333}]
    assert all(x.error is None and x.raw is None for x in res.records)
    assert res.end == p.stat().st_size
    assert r.head() == p.stat().st_size
    # resuming from any record's offset yields the rest
    res2 = r.read(8, 100)
    assert [x.offset for x in res2.records] == [8, 25]
    # nothing new
    assert r.read(res.end, 100).records == []
    assert r.read(res.end, 100).end == res.end
    r.close()


def test_max_records_limits_and_end_is_next_line(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b"".join(b'{"i":%d}\n' % i for i in range(10)))
    r = _reader(p)
    res = r.read(0, 3)
    assert [x.value["i"] for x in res.records if x.value] == [0, 1, 2]
    assert res.end == res.records[-1].offset + len(b'{"i":2}\n')
    got, end = _read_all(r, 0, 3)
    assert [x.value["i"] for x in got if x.value] == list(range(10))
    assert end == p.stat().st_size
    assert r.read(0, 0).records == [] and r.read(0, 0).end == 0


def test_partial_last_line_then_completed(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a":1}\n{"a":')
    r = _reader(p)
    res = r.read(0, 100)
    assert [x.value for x in res.records] == [{"a": 1}]
    assert res.end == 8
    assert r.read(8, 100).records == []
    assert r.read(8, 100).end == 8
    with p.open("ab") as f:
        f.write(b"2}\n")
    res = r.read(8, 100)
    assert [(x.offset, x.value) for x in res.records] == [(8, {"a": 2})]
    assert res.end == p.stat().st_size


def test_only_partial_line(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a":1')
    r = _reader(p)
    res = r.read(0, 10)
    assert res.records == [] and res.end == 0


def test_growing_file_is_followed(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b"")
    r = _reader(p)
    start = 0
    seen: list[int] = []
    with p.open("ab", buffering=0) as f:
        for i in range(50):
            f.write(orjson.dumps({"i": i}) + b"\n")
            if i % 7 == 0:
                f.write(b'{"i": ')  # a half-written line ...
                res = r.read(start, 4)
                seen += [x.value["i"] for x in res.records if x.value]
                start = res.end
                f.write(b"%d}\n" % (1000 + i))  # ... completed later
    got, _ = _read_all(r, start, 4)
    seen += [x.value["i"] for x in got if x.value]
    expected: list[int] = []
    for i in range(50):
        expected.append(i)
        if i % 7 == 0:
            expected.append(1000 + i)
    assert seen == expected


def test_blank_lines_are_covered_by_end(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'\n  \n{"a":1}\n\t\r\n\n{"a":2}\r\n\n\n')
    r = _reader(p)
    res = r.read(0, 100)
    assert [x.value for x in res.records] == [{"a": 1}, {"a": 2}]
    assert [x.offset for x in res.records] == [4, 16]
    assert res.end == p.stat().st_size
    # a file with only blank lines advances end without records
    q = tmp_path / "blank.jsonl"
    q.write_bytes(b"\n\n   \n")
    res = _reader(q).read(0, 100)
    assert res.records == [] and res.end == 6


def test_malformed_json_becomes_error_record(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a":1}\n{"a":\n{"a":1} trailing\nnot json\n{"a":3}\n')
    res = _reader(p).read(0, 100)
    assert [x.value for x in res.records] == [{"a": 1}, None, None, None, {"a": 3}]
    bad = res.records[1:4]
    assert [x.raw for x in bad] == [b'{"a":', b'{"a":1} trailing', b"not json"]
    for x in bad:
        assert x.error is not None and "not valid JSON" in x.error
        assert f"offset {x.offset}" in x.error
    assert res.end == p.stat().st_size


def test_invalid_utf8_becomes_error_record(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    line = b'{"name":"caf\xe9"}'
    p.write_bytes(b'{"a":1}\n' + line + b'\n{"a":2}\n')
    res = _reader(p).read(0, 100)
    assert [x.value for x in res.records] == [{"a": 1}, None, {"a": 2}]
    bad = res.records[1]
    assert bad.offset == 8 and bad.raw == line
    assert bad.error is not None and "UTF-8" in bad.error and "0xe9" in bad.error


def test_non_object_json_becomes_error_record(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'[1,2]\n"s"\n42\nnull\ntrue\n{"ok":1}\n')
    res = _reader(p).read(0, 100)
    assert [x.value for x in res.records] == [None] * 5 + [{"ok": 1}]
    kinds = ["an array", "a string", "a number", "null", "a boolean"]
    for rec, kind in zip(res.records, kinds, strict=False):
        assert rec.error is not None and kind in rec.error and "not a JSON object" in rec.error
    assert res.records[0].raw == b"[1,2]"


def test_utf8_bom_on_first_line(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a":1}\n{"a":2}\n')
    res = _reader(p).read(0, 100)
    assert [(x.offset, x.value) for x in res.records] == [(0, {"a": 1}), (11, {"a": 2})]


def test_twenty_megabyte_record(tmp_path: Path) -> None:
    big = "x" * (20 * 1024 * 1024)
    p = tmp_path / "f.jsonl"
    first = b'{"a":1}\n'
    big_line = orjson.dumps({"big": big}) + b"\n"
    p.write_bytes(first + big_line + b'{"a":3}\n')
    r = _reader(p)
    got, end = _read_all(r, 0, 1000)
    assert [x.offset for x in got] == [0, len(first), len(first) + len(big_line)]
    assert got[1].value == {"big": big}
    assert end == p.stat().st_size
    # starting right at the big record, and a big record that is still being written
    res = r.read(len(first), 1)
    assert res.records[0].value == {"big": big} and res.end == len(first) + len(big_line)
    q = tmp_path / "g.jsonl"
    q.write_bytes(big_line[:-100])
    rq = _reader(q)
    assert rq.read(0, 10).records == [] and rq.read(0, 10).end == 0
    with q.open("ab") as f:
        f.write(big_line[-100:])
    res = rq.read(0, 10)
    assert res.records[0].value == {"big": big} and res.end == len(big_line)


def test_truncated_file_raises(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a":1}\n{"a":2}\n')
    r = _reader(p)
    end = r.read(0, 100).end
    p.write_bytes(b'{"a":1}\n')  # truncated in place
    with pytest.raises(
        SourceError, match=r"committed offset 16 is past the end of the file of size 8"
    ):
        r.read(end, 100)


def test_replaced_file_raises_when_offset_is_not_a_line_start(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a":1}\n{"a":2}\n')
    r = _reader(p)
    assert r.read(0, 1).end == 8
    tmp = tmp_path / "new.jsonl"
    tmp.write_bytes(b'{"bbbbbb":1}\n{"a":2}\n')
    os.replace(tmp, p)
    with pytest.raises(SourceError, match="not at the start of a line"):
        r.read(8, 100)


def test_replaced_file_shorter_raises(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a":1}\n{"a":2}\n')
    r = _reader(p)
    end = r.read(0, 100).end
    tmp = tmp_path / "new.jsonl"
    tmp.write_bytes(b"{}\n")
    os.replace(tmp, p)
    with pytest.raises(SourceError, match="truncated or replaced"):
        r.read(end, 100)


def test_missing_file_raises(tmp_path: Path) -> None:
    p = tmp_path / "nope.jsonl"
    src = FileSource(p)
    with pytest.raises(SourceError, match=r"nope\.jsonl"):
        src.validate(None)  # type: ignore[arg-type]
    with pytest.raises(SourceError, match="does not exist"):
        src.open("0", OpenContext(""))
    with pytest.raises(SourceError, match="does not exist"):
        FileSource(tmp_path / "gone" / "*.jsonl").validate(None)  # type: ignore[arg-type]
    FileSource(tmp_path).validate(None)  # type: ignore[arg-type]  # a directory: many files


def test_deleted_while_reading_raises(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a":1}\n')
    r = _reader(p)
    r.read(0, 10)
    p.unlink()
    with pytest.raises(SourceError, match="no longer exists"):
        r.read(8, 10)

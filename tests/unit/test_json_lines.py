"""``FileReader.read_raw``: the undecoded fast path covers the same bytes as ``read``."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgstream.sources.file import FileReader, JsonLines

CONTENT = b'{"a": 1}\n\n{"a": 2}\n   \n[1]\n{bad\n\xef\xbb\xbf{"a": 3}\n{"a": 4}\n{"partial": '


@pytest.mark.parametrize("start_line", [0, 2, 5])
@pytest.mark.parametrize("max_records", [1, 3, 100])
def test_read_raw_matches_read(tmp_path: Path, start_line: int, max_records: int) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(CONTENT)
    start = sum(len(x) + 1 for x in CONTENT.split(b"\n")[:start_line])
    reader = FileReader(str(path))
    res = reader.read(start, max_records)
    lines = reader.read_raw(start, max_records)
    assert (lines.start, lines.end, lines.head) == (start, res.end, res.head)
    assert [(r.offset, r.value, r.error) for r in lines.records()] == [
        (r.offset, r.value, r.error) for r in res.records
    ]
    assert all(lines.offset(i) == start + sum(len(x) + 1 for x in lines.lines[:i])
               for i in range(len(lines)))  # fmt: skip
    reader.close()


def test_extend_requires_contiguous_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(CONTENT)
    reader = FileReader(str(path))
    first = reader.read_raw(0, 2)
    second = reader.read_raw(first.end, 3)
    both = reader.read_raw(0, 5)
    first.offset(1)  # cached offsets are recomputed after extend
    first.extend(second)
    assert (first.lines, first.end) == (both.lines, both.end)
    assert [first.offset(i) for i in range(5)] == [both.offset(i) for i in range(5)]
    with pytest.raises(ValueError, match="do not continue"):
        first.extend(JsonLines([b"{}"], first.end + 1, first.end + 4))
    reader.close()

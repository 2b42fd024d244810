"""The poison-input catalogue (issue 3 part 7, README "Guarantees", invariant 7).

One file holds ordinary records and, scattered between them, every kind of bad input:

* malformed JSON and invalid UTF-8 (the source cannot decode them);
* a valid record of about 24 MB (must be processed, exactly once) and a malformed one of
  about 24 MB (must be dead-lettered with its whole payload);
* a record that makes the operator raise;
* a key of the wrong type for the sink's key column (text into bigint);
* a NULL for a NOT NULL sink column; a value violating the sink's CHECK constraint.

With the default ``on_error="dead_letter"`` each bad record ends in ``pgstream.dead_letters``
(the sink rejections are isolated by bisecting the batch) and every other record's output
is exact. With ``on_error="fail"`` the worker stops with a clear message and commits
nothing past the bad record. A record whose operator kills the process (``os._exit``) is
dead-lettered after a bounded number of restarts, as a supervisor would restart it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from netfaults import assert_ledger_tiles, file_lines, verify_clean

import pgstream as ps
from pgstream.errors import RecordFailedError
from pgstream.runtime.worker import Worker

HERE = Path(__file__).resolve().parent
BIG = 24 * 1024 * 1024

DDL = """
CREATE TABLE pfacts (
    id bigint NOT NULL, user_id bigint, cents bigint NOT NULL CHECK (cents > -100000),
    size integer NOT NULL,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX pfacts_pos ON pfacts (_source, _partition, _offset, _seq);
CREATE TABLE ptotals (user_id bigint PRIMARY KEY, n bigint NOT NULL, total numeric);
"""


def to_fact(r: dict[str, Any]) -> dict[str, Any]:
    if r.get("boom"):
        raise ValueError(f"boom in record {r['id']}")
    if r.get("die"):
        os._exit(1)  # the process dies: no exception, no cleanup, no commit
    amount = r.get("amount")
    return {
        "id": r["id"],
        "user_id": r["user"],
        "cents": None if amount is None else amount * 100,
        "size": len(r.get("blob", "")),
    }


def poison_app(name: str, path: Path, **kw: Any) -> ps.App:
    app = ps.App(name, batch_size=200, max_interval=0.05, poll_interval=0.02, **kw)
    s = app.stream("events", ps.FileSource(path))
    s.map(to_fact).to_table("pfacts")
    s.filter(lambda r: r.get("amount") is not None).key_by("user", name="user_id").aggregate(
        n=ps.count(), total=ps.sum("amount")
    ).to_table("ptotals")
    return app


# -- inputs and their reference -------------------------------------------------------------------


def good(i: int) -> dict[str, Any]:
    return {"id": i, "user": i % 17, "amount": (i * 37) % 91 - 30}


# kind -> (line maker, expected dead-letter operator or None if processed, error fragment)
POISON: dict[str, tuple[Any, str | None, str]] = {
    "malformed_json": (
        lambda i: b'{"id": %d, "user": 1, "amount": ' % i, "decode", "not valid JSON"
    ),
    "invalid_utf8": (lambda i: b'{"id": %d, "user": "\xff\xfe"}' % i, "decode", "not valid UTF-8"),
    "not_an_object": (lambda i: b"[1, 2, 3]", "decode", "not a JSON object"),
    "operator_raises": (
        lambda i: json.dumps({**good(i), "boom": True}).encode(), "to_table(pfacts)", "boom"
    ),
    "wrong_key_type": (
        lambda i: json.dumps({**good(i), "user": f"user-{i}"}).encode(), "sink", "sink rejected"
    ),
    "null_not_null": (
        lambda i: json.dumps({**good(i), "amount": None}).encode(), "sink", "null value"
    ),
    "check_violation": (
        lambda i: json.dumps({**good(i), "amount": -5000}).encode(), "sink", "check constraint"
    ),
    "huge_valid": (
        lambda i: json.dumps({**good(i), "blob": "x" * BIG}).encode(), None, ""
    ),
    "huge_malformed": (
        lambda i: b'{"id": %d, "blob": "' % i + b"y" * BIG, "decode", "not valid JSON"
    ),
}


@dataclass
class Input:
    path: Path
    poison_at: dict[int, str]  # byte offset -> kind


def write_input(path: Path, n: int, kinds: list[str], every: int = 97) -> Input:
    """``n`` good records with the poison ``kinds`` interleaved every ``every`` records."""
    poison_at: dict[int, str] = {}
    pos = 0
    queue = list(kinds)
    with open(path, "wb") as f:
        for i in range(n):
            if i % every == every // 2 and queue:
                kind = queue.pop(0)
                line = POISON[kind][0](100_000 + i) + b"\n"
                poison_at[pos] = kind
            else:
                line = json.dumps(good(i)).encode() + b"\n"
            f.write(line)
            pos += len(line)
    assert not queue, "not enough records to place every poison"
    return Input(path, poison_at)


Outputs = tuple[Counter[Any], dict[int, tuple[int, int]], dict[int, str]]


def reference(inp: Input, upto: int | None = None) -> Outputs:
    """(pfacts rows, ptotals, dead offset -> operator) from the raw file, without pgstream."""
    facts: Counter[Any] = Counter()
    totals: dict[int, tuple[int, int]] = {}
    dead: dict[int, str] = {}
    for off, line in file_lines(inp.path.read_bytes()):
        if upto is not None and off >= upto:
            break
        kind = inp.poison_at.get(off)
        if kind is not None and POISON[kind][1] is not None:
            dead[off] = str(POISON[kind][1])
            continue
        r = json.loads(line)
        facts[(r["id"], r["user"], r["amount"] * 100, len(r.get("blob", "")), off)] += 1
        n, t = totals.get(r["user"], (0, 0))
        totals[r["user"]] = (n + 1, t + r["amount"])
    return facts, totals, dead


def actual(conn: psycopg.Connection[Any], job: str) -> Outputs:
    facts: Counter[Any] = Counter(
        tuple(r) for r in conn.execute(
            "SELECT id, user_id, cents, size, _offset FROM pfacts"
        ).fetchall()
    )
    totals = {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in conn.execute("SELECT user_id, n, total FROM ptotals").fetchall()
    }
    dead = {
        int(r[0]): str(r[1])
        for r in conn.execute(
            'SELECT "offset", operator FROM pgstream.dead_letters WHERE job = %s', [job]
        ).fetchall()
    }
    return facts, totals, dead


def assert_matches(conn: psycopg.Connection[Any], job: str, inp: Input, upto: int | None = None
                   ) -> None:
    want_f, want_t, want_d = reference(inp, upto)
    got_f, got_t, got_d = actual(conn, job)
    lost, extra = want_f - got_f, got_f - want_f
    assert not lost and not extra, f"pfacts: lost {list(lost)[:3]}, unexpected {list(extra)[:3]}"
    assert got_t == want_t
    assert got_d == want_d, f"dead letters {got_d} != {want_d}"


# -- dead_letter (default) ------------------------------------------------------------------------


def test_every_poison_ends_in_dead_letters_and_the_rest_is_exact(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pg_conn.execute(DDL)
    kinds = list(POISON)
    inp = write_input(tmp_path / "events.jsonl", 1_200, kinds)
    app = poison_app("poison", inp.path)

    summary = Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()

    dead_kinds = [k for k in kinds if POISON[k][1] is not None]
    assert summary.dead_letters == len(dead_kinds)
    size = inp.path.stat().st_size
    assert assert_ledger_tiles(pg_conn, "poison", {("events", "0"): 0}) == {("events", "0"): size}
    assert_matches(pg_conn, "poison", inp)
    rows = pg_conn.execute(
        'SELECT "offset", error, length(payload) FROM pgstream.dead_letters WHERE job = %s',
        ["poison"],
    ).fetchall()
    by_offset = {int(r[0]): (r[1], r[2]) for r in rows}
    data = inp.path.read_bytes()
    for off, kind in inp.poison_at.items():
        fragment = POISON[kind][2]
        if POISON[kind][1] is None:
            continue
        error, length = by_offset[off]
        assert fragment in error, f"{kind}: {error!r}"
        line_len = data.index(b"\n", off) - off
        if kind in ("malformed_json", "invalid_utf8", "huge_malformed", "not_an_object"):
            assert length == line_len, f"{kind}: the raw line is kept whole"
    # the huge valid record was processed once, whole
    huge = [o for o, k in inp.poison_at.items() if k == "huge_valid"]
    assert pg_conn.execute("SELECT size FROM pfacts WHERE _offset = %s", huge).fetchall() == [
        (BIG,)
    ]
    verify_clean(app, pg_dsn)


# -- on_error="fail" ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("invalid_utf8", "not valid UTF-8"),
        ("operator_raises", "ValueError: boom"),
        ("check_violation", "sink rejected"),
        ("wrong_key_type", "sink rejected"),
    ],
)
def test_on_error_fail_stops_at_the_bad_record_and_commits_nothing_past_it(
    kind: str, message: str, pg_dsn: str, pg_conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pg_conn.execute(DDL)
    inp = write_input(tmp_path / "events.jsonl", 600, [kind], every=700)
    [(bad, _)] = inp.poison_at.items()
    app = poison_app("failing", inp.path, on_error="fail")

    for _ in range(2):  # a restart stops at the same record again, it does not skip it
        with pytest.raises(RecordFailedError) as err:
            Worker(app, pg_dsn, stop_when_idle=True, install_signal_handlers=False).run()
        assert f"record at offset {bad} " in str(err.value) and message in str(err.value)

    committed = assert_ledger_tiles(pg_conn, "failing", {("events", "0"): 0})
    top = committed[("events", "0")]
    assert top is not None and top <= bad, f"committed {top} past the bad record at {bad}"
    assert_matches(pg_conn, "failing", inp, upto=top)
    assert pg_conn.execute("SELECT count(*) FROM pgstream.dead_letters").fetchone() == (0,)
    got_f, _, _ = actual(pg_conn, "failing")
    assert all(row[4] < bad for row in got_f), "an output from past the bad record"


# -- a record that kills the process ------------------------------------------------------------


@pytest.mark.slow
def test_a_record_that_kills_the_worker_is_dead_lettered_after_bounded_restarts(
    pg_dsn: str, pg_conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pg_conn.execute(DDL)
    path = tmp_path / "events.jsonl"
    killer_at = 0
    with open(path, "wb") as f:
        pos = 0
        for i in range(1_000):
            rec = good(i)
            if i == 450:  # in the middle of the third batch of 200
                rec["die"] = True
                killer_at = pos
            line = json.dumps(rec).encode() + b"\n"
            f.write(line)
            pos += len(line)
    (tmp_path / "killapp.py").write_text(
        "import os\n"
        "from pathlib import Path\n"
        "from test_poison import poison_app\n"
        "app = poison_app('killer', Path(os.environ['KILL_FILE']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSTREAM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(HERE)]), KILL_FILE=str(path))
    size = path.stat().st_size

    def committed() -> int | None:
        row = pg_conn.execute(
            "SELECT committed_offset FROM pgstream.partitions WHERE job = 'killer'"
        ).fetchone()
        return None if row is None else row[0]

    deaths = runs = 0
    while committed() != size:
        runs += 1
        assert runs <= 30, f"still not done after {runs - 1} runs ({deaths} deaths)"
        res = subprocess.run(
            [sys.executable, "-m", "pgstream", "run", "killapp:app", "--dsn", pg_dsn,
             "--stop-when-idle"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )
        if res.returncode != 0:
            assert "error:" not in res.stderr and "Traceback" not in res.stderr, res.stderr
            deaths += 1
    # With max_record_attempts = L: L deaths on the full batch, 1 walking it one record at
    # a time up to the killer, L with the killer first in its batch, L with it alone: then
    # it is set aside (3L + 1 = 10). A death while the next batch is evaluated ahead of its
    # attempt being counted costs at most one more per phase. Never a crash loop.
    limit = ps.Settings().max_record_attempts
    print(f"{runs} runs, {deaths} deaths")
    assert deaths <= 4 * limit + 2, f"{deaths} deaths"

    rows = pg_conn.execute(
        'SELECT "offset", operator, error FROM pgstream.dead_letters WHERE job = %s', ["killer"]
    ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(killer_at, "worker")]
    assert "the worker died" in rows[0][2]
    inp = Input(path, {killer_at: "killer"})
    want_f, want_t, _ = reference_without(inp, killer_at)
    got_f, got_t, _ = actual(pg_conn, "killer")
    assert got_f == want_f and got_t == want_t
    assert_ledger_tiles(pg_conn, "killer", {("events", "0"): 0})
    verify_clean(poison_app("killer", path), pg_dsn)


def reference_without(inp: Input, skip: int) -> Outputs:
    facts: Counter[Any] = Counter()
    totals: dict[int, tuple[int, int]] = {}
    for off, line in file_lines(inp.path.read_bytes()):
        if off == skip:
            continue
        r = json.loads(line)
        facts[(r["id"], r["user"], r["amount"] * 100, 0, off)] += 1
        n, t = totals.get(r["user"], (0, 0))
        totals[r["user"]] = (n + 1, t + r["amount"])
    return facts, totals, {skip: "worker"}

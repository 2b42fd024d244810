"""``pgstream dlq list|show|redrive`` (issue 10 part 3), through the real command line.

The app's map raises for some records while ``DLQAPP_MODE=broken`` (every id % 7 == 3),
fewer once ``half`` fixed (id % 21 == 3), none when ``fixed``. A run in ``broken`` mode
dead-letters them; redrive with today's code writes their effects exactly once: the sinks
then equal a reference computed from the input file with ``json`` (not pgstream), running
redrive again changes nothing, a redrive killed with SIGKILL between chunks and run again
ends exact, and ``pgstream verify`` is clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proctools import cli_env, run_cli, start_cli

APP = """
import os
import pgstream as ps

MODE = os.environ.get("DLQAPP_MODE", "fixed")
BAD = {"broken": 7, "half": 21}.get(MODE)

app = ps.App("dlqjob", batch_size=int(os.environ.get("DLQAPP_BATCH", "100")),
             max_interval=0.05, poll_interval=0.02)
events = app.stream("events", ps.FileSource(os.environ["DLQAPP_FILE"]))


def fact(r):
    if BAD is not None and r["id"] % BAD == 3:
        raise ValueError(f"cannot price event {r['id']}")
    return {"id": r["id"], "user_id": r["user"], "cents": r["amount"] * 100}


events.map(fact).to_table("facts")
events.key_by("user", name="user_id").aggregate(
    n=ps.count(), total=ps.sum("amount")
).to_table("totals")
"""

DDL = """
CREATE TABLE facts (id bigint NOT NULL, user_id bigint, cents bigint,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX facts_pos ON facts (_source, _partition, _offset, _seq);
CREATE TABLE totals (user_id bigint PRIMARY KEY, n bigint NOT NULL, total numeric);
"""

USERS = 13


def _line(i: int) -> bytes:
    return b'{"id": %d, "user": %d, "amount": %d}\n' % (i, i % USERS, (i * 31) % 101 - 20)


def _setup(tmp_path: Path, conn: psycopg.Connection[Any], n: int) -> tuple[dict[str, str], bytes]:
    (tmp_path / "dlqapp.py").write_text(APP)
    data = b"".join(_line(i) for i in range(n))
    (tmp_path / "events.jsonl").write_bytes(data)
    conn.execute(DDL)
    return cli_env(DLQAPP_FILE=str(tmp_path / "events.jsonl"), PYTHONUNBUFFERED="1"), data


def _cli(
    tmp_path: Path, env: dict[str, str], mode: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = run_cli(*args, cwd=tmp_path, env={**env, "DLQAPP_MODE": mode}, timeout=180)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _run_broken(tmp_path: Path, env: dict[str, str], dsn: str) -> None:
    _cli(tmp_path, env, "broken", "run", "dlqapp:app", "--dsn", dsn, "--stop-when-idle")


def _offsets(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    out, pos = [], 0
    for line in data.splitlines(keepends=True):
        out.append((pos, json.loads(line)))
        pos += len(line)
    return out


def _reference(data: bytes, bad: int | None) -> tuple[Counter[Any], dict[int, tuple[int, int]]]:
    """facts rows and totals for every record except those failing ``id % bad == 3``."""
    facts: Counter[Any] = Counter()
    totals: dict[int, tuple[int, int]] = {}
    for off, r in _offsets(data):
        if bad is not None and r["id"] % bad == 3:
            continue
        facts[(r["id"], r["user"], r["amount"] * 100, "events", "0", off, 0)] += 1
        n, t = totals.get(r["user"], (0, 0))
        totals[r["user"]] = (n + 1, t + r["amount"])
    return facts, totals


def _sinks(conn: psycopg.Connection[Any]) -> tuple[Counter[Any], dict[int, tuple[int, int]]]:
    facts = Counter(
        tuple(r)
        for r in conn.execute(
            "SELECT id, user_id, cents, _source, _partition, _offset, _seq FROM facts"
        )
    )
    totals = {
        int(u): (int(n), int(t)) for u, n, t in conn.execute("SELECT user_id, n, total FROM totals")
    }
    return facts, totals


def _assert_exact(conn: psycopg.Connection[Any], data: bytes, bad: int | None) -> None:
    want_facts, want_totals = _reference(data, bad)
    got_facts, got_totals = _sinks(conn)
    lost, extra = want_facts - got_facts, got_facts - want_facts
    assert not lost and not extra, f"lost {list(lost)[:3]}, duplicated/extra {list(extra)[:3]}"
    assert got_totals == want_totals


def _dead(conn: psycopg.Connection[Any]) -> dict[int, tuple[bool, int, str | None]]:
    """offset -> (redriven, redrive_attempts, redrive_error)."""
    rows = conn.execute(
        'SELECT "offset", redriven, redrive_attempts, redrive_error FROM pgstream.dead_letters'
    )
    return {int(r[0]): (bool(r[1]), int(r[2]), r[3]) for r in rows}


def _verify_clean(tmp_path: Path, env: dict[str, str], dsn: str) -> str:
    done = _cli(tmp_path, env, "fixed", "verify", "dlqapp:app", "--dsn", dsn, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_list_and_show_select_the_right_rows(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 200)
    _run_broken(tmp_path, env, pg_dsn)
    records = _offsets(data)
    failing = [(off, r) for off, r in records if r["id"] % 7 == 3]
    assert sorted(_dead(pg_conn)) == [off for off, _ in failing]

    def listed(*args: str) -> list[dict[str, Any]]:
        out = _cli(
            tmp_path,
            env,
            "broken",
            "dlq",
            "list",
            "dlqapp:app",
            "--dsn",
            pg_dsn,
            "--json",
            "--limit",
            "1000",
            *args,
        ).stdout
        rows: list[dict[str, Any]] = json.loads(out)
        return rows

    everything = listed()
    assert [r["offset"] for r in everything] == [off for off, _ in failing]
    assert not any(r["redriven"] for r in everything)
    assert {r["operator"] for r in everything} == {"to_table(facts)"}
    # offset range: from inclusive, to exclusive
    lo, hi = failing[3][0], failing[7][0]
    assert [r["offset"] for r in listed("--from-offset", str(lo), "--to-offset", str(hi))] == [
        off for off, _ in failing[3:7]
    ]
    # error text (case-insensitive substring), operator, stream, partition
    one = failing[5][1]["id"]
    assert [r["offset"] for r in listed("--error", f"CANNOT PRICE EVENT {one}\n"[:-1])] == [
        failing[5][0]
    ]
    assert len(listed("--operator", "to_table")) == len(failing)
    assert listed("--operator", "aggregate") == []
    assert listed("--source", "nope") == []
    assert len(listed("--stream", "events", "--partition", "0")) == len(failing)
    assert listed("--status", "redriven") == []
    # the table form names the count
    table = _cli(tmp_path, env, "broken", "dlq", "list", "dlqapp:app", "--dsn", pg_dsn).stdout
    assert f"{len(failing)} dead letter(s) match: {len(failing)} open, 0 redriven" in table
    # show: provenance, error with the user's file and line, payload
    first = everything[0]["id"]
    shown = _cli(
        tmp_path, env, "broken", "dlq", "show", "dlqapp:app", str(first), "--dsn", pg_dsn
    ).stdout
    assert f"events/0 offset {failing[0][0]}" in shown
    assert f"cannot price event {failing[0][1]['id']}" in shown
    assert "dlqapp.py" in shown
    assert json.loads(shown.strip().splitlines()[-1]) == failing[0][1]  # the payload
    missing = _cli(
        tmp_path, env, "broken", "dlq", "show", "dlqapp:app", "999999", "--dsn", pg_dsn, check=False
    )
    assert missing.returncode != 0
    assert "no dead letter with id 999999" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_redrive_after_a_fix_is_exactly_once_and_idempotent(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 400)
    _run_broken(tmp_path, env, pg_dsn)
    _assert_exact(pg_conn, data, 7)
    before = _dead(pg_conn)
    redrive = ["dlq", "redrive", "dlqapp:app", "--dsn", pg_dsn, "--chunk", "7"]

    # a dry run says what would happen and changes nothing
    dry = _cli(tmp_path, env, "half", *redrive).stdout
    n_all = len(before)
    n_half = sum(1 for _, r in _offsets(data) if r["id"] % 21 == 3)
    assert f"{n_all - n_half} dead letter(s) would be redriven" in dry, dry
    assert f"{n_half} would still fail" in dry, dry
    assert _dead(pg_conn) == before
    _assert_exact(pg_conn, data, 7)

    # half fixed: the others get their effect; the still failing stay open, with the new error
    out = _cli(tmp_path, env, "half", *redrive, "--yes").stdout
    assert f"{n_all - n_half} dead letter(s) redriven" in out, out
    _assert_exact(pg_conn, data, 21)
    dead = _dead(pg_conn)
    still = {off for off, (done, _, _) in dead.items() if not done}
    assert len(still) == n_half
    assert all(dead[o][1] == 1 and "cannot price event" in (dead[o][2] or "") for o in still)
    assert all(dead[o][1] == 1 and dead[o][2] is None for o in dead.keys() - still)

    # again: nothing more is applied; the failing ones count another attempt
    _cli(tmp_path, env, "half", *redrive, "--yes")
    _assert_exact(pg_conn, data, 21)
    assert {o for o, (done, _, _) in _dead(pg_conn).items() if not done} == still

    # fully fixed: everything, once; verify accounts for the redriven records
    _cli(tmp_path, env, "fixed", *redrive, "--yes")
    _assert_exact(pg_conn, data, None)
    assert all(done for done, _, _ in _dead(pg_conn).values())
    report = _verify_clean(tmp_path, env, pg_dsn)
    assert f"{n_all} redriven dead letters" in report, report
    again = _cli(tmp_path, env, "fixed", *redrive, "--yes").stdout
    assert "nothing to redrive" in again
    _assert_exact(pg_conn, data, None)
    # the status views count open dead letters only
    view = pg_conn.execute(
        "SELECT dead_letters, dead_letters_open FROM pgstream.job_status WHERE job = 'dlqjob'"
    ).fetchone()
    assert view == (n_all, 0)


def test_redrive_killed_mid_way_then_run_again_is_exact(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 2100)
    env["DLQAPP_BATCH"] = "500"
    _run_broken(tmp_path, env, pg_dsn)
    total = len(_dead(pg_conn))
    assert total == 300
    redrive = ["dlq", "redrive", "dlqapp:app", "--dsn", pg_dsn, "--chunk", "10", "--yes"]

    # SIGKILL right before the 4th chunk's COMMIT: three chunks landed, nothing of the 4th
    crash = {**env, "PGSTREAM_CRASH_AT": "redrive_before_commit", "PGSTREAM_CRASH_AFTER": "4"}
    killed = _cli(tmp_path, crash, "fixed", *redrive, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    done = {o for o, (d, _, _) in _dead(pg_conn).items() if d}
    assert len(done) == 30
    facts, _ = _sinks(pg_conn)
    assert sum(facts.values()) == 2100 - total + 30

    # a kill at a random moment (by another process), while chunks are committing
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgstream", *redrive[:-3], "--chunk", "2", "--yes"],
        cwd=tmp_path,
        env={**env, "DLQAPP_MODE": "fixed"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = pg_conn.execute(
                "SELECT count(*) FROM pgstream.dead_letters WHERE redriven"
            ).fetchone()
            if n is not None and n[0] >= 60:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = sum(1 for d, _, _ in _dead(pg_conn).values() if d)
    assert 30 < partial < total, partial

    _cli(tmp_path, env, "fixed", *redrive)
    _assert_exact(pg_conn, data, None)
    assert all(d and attempts == 1 for d, attempts, _ in _dead(pg_conn).values())
    _verify_clean(tmp_path, env, pg_dsn)


def test_redrive_refuses_a_stream_with_a_fold(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, _ = _setup(tmp_path, pg_conn, 50)
    pg_conn.execute("CREATE TABLE folds (user_id bigint PRIMARY KEY, n bigint)")
    with open(tmp_path / "dlqapp.py", "a") as f:
        f.write(
            'events.key_by("user", name="user_id").fold({"n": 0}, '
            'lambda s, r: {"n": s["n"] + 1}).to_table("folds")\n'
        )
    _run_broken(tmp_path, env, pg_dsn)
    before = _dead(pg_conn)
    assert before
    done = _cli(
        tmp_path,
        env,
        "fixed",
        "dlq",
        "redrive",
        "dlqapp:app",
        "--dsn",
        pg_dsn,
        "--yes",
        check=False,
    )
    assert done.returncode != 0
    assert "events feed a fold" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _dead(pg_conn) == before


@pytest.mark.parametrize(
    "window",
    [
        "ps.session(gap=5), time=\"id\"",
        "ps.tumbling(seconds=5), time=\"id\", emit=\"final\"",
        "ps.tumbling(seconds=5), time=\"id\", grace=2",
    ],
    ids=["session", "final", "grace"],
)
def test_redrive_refuses_a_stream_with_session_windows(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], window: str
) -> None:
    """Sessions, final rows and windows closed by a watermark depend on record order."""
    env, _ = _setup(tmp_path, pg_conn, 50)
    pg_conn.execute(
        "CREATE TABLE visits (user_id bigint, window_start timestamptz, n bigint, "
        "PRIMARY KEY (user_id, window_start))"
    )
    with open(tmp_path / "dlqapp.py", "a") as f:
        f.write(
            f'events.key_by("user", name="user_id").window({window})'
            '.aggregate(n=ps.count()).to_table("visits")\n'
        )
    _run_broken(tmp_path, env, pg_dsn)
    before = _dead(pg_conn)
    assert before
    done = _cli(
        tmp_path, env, "fixed", "dlq", "redrive", "dlqapp:app", "--dsn", pg_dsn, "--yes",
        check=False,
    )
    assert done.returncode != 0
    assert "events feed a fold or session windows" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _dead(pg_conn) == before


@pytest.mark.parametrize("status", ["redriven", "all"])
def test_redrive_takes_open_dead_letters_only(status: str) -> None:
    import pgstream as ps
    from pgstream.errors import ConfigError
    from pgstream.redrive import Filters, Redriver

    with pytest.raises(ConfigError, match="only open dead letters"):
        Redriver(ps.App("x"), None, Filters(status=status))  # type: ignore[arg-type]


def test_a_record_the_sink_rejects_stays_open_and_the_chunk_goes_on(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 200)
    _run_broken(tmp_path, env, pg_dsn)
    # id 10 failed (10 % 7 == 3); now the sink refuses its row
    pg_conn.execute("ALTER TABLE facts ADD CONSTRAINT no_ten CHECK (id <> 10)")
    redrive = ["dlq", "redrive", "dlqapp:app", "--dsn", pg_dsn, "--yes"]
    out = _cli(tmp_path, env, "fixed", *redrive).stdout
    assert "1 still fail" in out and "no_ten" in out, out
    ten = next(off for off, r in _offsets(data) if r["id"] == 10)
    dead = _dead(pg_conn)
    assert {o for o, (d, _, _) in dead.items() if not d} == {ten}
    assert "sink rejected" in (dead[ten][2] or "")
    # neither its fact nor its aggregate delta was written (the savepoint took both back)
    want_facts, want_totals = _reference(data, None)
    got_facts, got_totals = _sinks(pg_conn)
    r10 = dict(_offsets(data))[ten]
    assert want_facts - got_facts == Counter(
        {(10, r10["user"], r10["amount"] * 100, "events", "0", ten, 0): 1}
    )
    n, t = want_totals[r10["user"]]
    assert got_totals == {**want_totals, r10["user"]: (n - 1, t - r10["amount"])}
    # the table fixed: the last one goes through
    pg_conn.execute("ALTER TABLE facts DROP CONSTRAINT no_ten")
    _cli(tmp_path, env, "fixed", *redrive)
    _assert_exact(pg_conn, data, None)
    _verify_clean(tmp_path, env, pg_dsn)


def test_redrive_alongside_a_live_worker(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 1000)
    _run_broken(tmp_path, env, pg_dsn)
    path = tmp_path / "events.jsonl"
    fixed = {**env, "DLQAPP_MODE": "fixed"}
    worker = start_cli(
        "run", "dlqapp:app", "--dsn", pg_dsn, cwd=tmp_path, env=fixed, stdout=subprocess.DEVNULL
    )
    try:
        args = ["--dsn", pg_dsn, "--chunk", "3", "--yes"]
        redrive = start_cli("dlq", "redrive", "dlqapp:app", *args, cwd=tmp_path, env=fixed)
        for start in range(1000, 2000, 100):  # new records arrive meanwhile
            with open(path, "ab") as f:
                f.write(b"".join(_line(i) for i in range(start, start + 100)))
            time.sleep(0.05)
        out, err = redrive.communicate(timeout=120)
        assert redrive.returncode == 0, out + err
        data = path.read_bytes()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = pg_conn.execute(
                "SELECT committed_offset FROM pgstream.partitions WHERE job = 'dlqjob'"
            ).fetchone()
            if row is not None and row[0] == len(data):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker did not catch up")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, werr = worker.communicate(timeout=60)
    assert worker.returncode == 0, werr
    _assert_exact(pg_conn, data, None)
    assert all(d for d, _, _ in _dead(pg_conn).values())
    _verify_clean(tmp_path, env, pg_dsn)


def test_job_reset_refuses_while_a_redrive_chunk_is_in_flight(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    from pgstream.db import queries

    env, _ = _setup(tmp_path, pg_conn, 50)
    _run_broken(tmp_path, env, pg_dsn)
    with psycopg.connect(pg_dsn) as chunk:  # a chunk's first statement, transaction open
        params = {"job": "dlqjob", "source": None}
        assert chunk.execute(queries.DLQ_LOCK_PARTITIONS, params).fetchall()
        args = ["--stream", "events", "--yes", "--dsn", pg_dsn]
        done = _cli(tmp_path, env, "fixed", "job", "reset", "dlqapp:app", *args, check=False)
        assert done.returncode != 0
        assert "holds its partition rows" in done.stderr, done.stderr
        # a worker's checkpoint UPDATE (no key change) is not blocked by it
        with psycopg.connect(pg_dsn, autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")
            other.execute("UPDATE pgstream.partitions SET attempts = attempts WHERE job = 'dlqjob'")


TABLE_APP = """
import os
import pgstream as ps

BROKEN = os.environ.get("DLQAPP_MODE") == "broken"
app = ps.App("dlqtable", batch_size=50, max_interval=0.05, poll_interval=0.02)
orders = app.stream("orders", ps.TableSource("public.orders", offset_column="id"))


def fact(r):
    if BROKEN and r["id"] % 5 == 0:
        raise ValueError(f"cannot price order {r['id']}")
    return {"id": r["id"], "user_id": r["user_id"], "cents": int(r["amount"] * 100)}


orders.map(fact).to_table("facts")
orders.key_by("user_id").aggregate(n=ps.count(), total=ps.sum("amount")).to_table("totals")
"""


def test_redrive_rereads_a_table_source_with_its_types(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    """The row is re-read from the table (a numeric amount arrives as a Decimal, as in the
    worker and in verify), not rebuilt from its JSON payload (where it is a string)."""
    env, _ = _setup(tmp_path, pg_conn, 1)
    (tmp_path / "dlqapp.py").write_text(TABLE_APP)
    pg_conn.execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL,"
        " amount numeric(10, 2) NOT NULL)"
    )
    pg_conn.execute(
        "INSERT INTO orders (user_id, amount) SELECT i % 7, ((i * 37) % 1000) / 100.0"
        " FROM generate_series(1, 300) AS i"
    )
    _run_broken(tmp_path, env, pg_dsn)
    assert len(_dead(pg_conn)) == 60
    _cli(tmp_path, env, "fixed", "dlq", "redrive", "dlqapp:app", "--dsn", pg_dsn, "--yes")
    assert all(d for d, _, _ in _dead(pg_conn).values())
    facts = pg_conn.execute(
        "SELECT f.cents = (o.amount * 100)::bigint, count(*) FROM orders o"
        " LEFT JOIN facts f ON f.id = o.id AND f._offset = o.id GROUP BY 1"
    ).fetchall()
    assert facts == [(True, 300)]
    totals = pg_conn.execute(
        "SELECT count(*) FROM totals t JOIN (SELECT user_id, count(*) n, sum(amount) s"
        " FROM orders GROUP BY 1) o USING (user_id) WHERE t.n = o.n AND t.total = o.s"
    ).fetchone()
    assert totals == (7,)
    _verify_clean(tmp_path, env, pg_dsn)


def test_redrive_refuses_a_plan_the_job_has_not_accepted(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = _setup(tmp_path, pg_conn, 100)
    _run_broken(tmp_path, env, pg_dsn)
    before = _dead(pg_conn)
    app = tmp_path / "dlqapp.py"
    app.write_text(
        app.read_text().replace('"cents": r["amount"] * 100', '"cents": r["amount"] * 100 + 0')
    )
    redrive = ["dlq", "redrive", "dlqapp:app", "--dsn", pg_dsn, "--yes"]
    done = _cli(tmp_path, env, "fixed", *redrive, check=False)
    assert done.returncode != 0
    assert "differs from the recorded plan of job 'dlqjob'" in done.stderr, done.stderr
    assert "--accept-changes" in done.stderr
    assert _dead(pg_conn) == before
    _cli(
        tmp_path,
        env,
        "fixed",
        "run",
        "dlqapp:app",
        "--dsn",
        pg_dsn,
        "--stop-when-idle",
        "--accept-changes",
    )
    _cli(tmp_path, env, "fixed", *redrive)
    _assert_exact(pg_conn, data, None)
    report = _verify_clean(tmp_path, env, pg_dsn)
    assert "redriven dead letters" in report, report

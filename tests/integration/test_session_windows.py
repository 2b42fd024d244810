"""Session windows end to end on a real database: out-of-order input whose sessions merge
across batches, in update and final mode, compared with the offline reference of
tests/windowref.py (rows, ``window_end``, late records, dead letters) whatever the batch size,
continued by a new worker from the committed sessions, and audited by ``pgstream verify``."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from windowref import SessionReference, file_records, session_reference

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.runtime.worker import run_app
from pgstream.verify import verify_app

T0 = 1_700_000_000
GAP, GRACE = 8.0, 20.0


def session_events(n: int, seed: int) -> list[str]:
    """Bursts of a few users' events, out of order (some seconds, sometimes minutes late),
    with a few unreadable times: sessions split, then merge when a late record bridges them."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        t = float(T0 + i + (i // 100) * 60)
        if rng.random() < 0.4:
            t -= rng.random() * 20
        if rng.random() < 0.03:
            t -= 200 + rng.random() * 200
        rec: dict[str, Any] = {"user": f"u{rng.randrange(4)}", "v": rng.randrange(100), "ts": t}
        if rng.random() < 0.01:
            rec["ts"] = "soon"
        lines.append(json.dumps(rec))
    return lines


def session_app(path: Path, batch_size: int, emit: str, table: str = "sessions") -> ps.App:
    app = ps.App("clicks", batch_size=batch_size)
    clicks = app.stream("clicks", ps.FileSource(str(path)))
    clicks.key_by("user", name="user_id").window(
        ps.session(gap=GAP), time="ts", grace=GRACE, emit=emit  # type: ignore[arg-type]
    ).aggregate(n=ps.count(), total=ps.sum("v")).to_table(table)
    return app


def sink_table(conn: psycopg.Connection[Any], name: str = "sessions") -> None:
    conn.execute(
        f"CREATE TABLE {name} (user_id text, window_start timestamptz, window_end timestamptz, "
        "n bigint, total bigint, PRIMARY KEY (user_id, window_start))"
    )


def check(conn: psycopg.Connection[Any], ref: SessionReference, table: str = "sessions") -> None:
    rows = conn.execute(f"SELECT user_id, window_start, window_end, n, total FROM {table}")
    stored = {(u, us(ws)): (n, t, us(we)) for u, ws, we, n, t in rows}
    assert {k: v[:2] for k, v in stored.items()} == {
        (u, round(s, 6)): v for (u, s), v in ref.windows.items()
    }
    assert {k: v[2] for k, v in stored.items()} == {
        (u, round(s, 6)): round(e, 6) for (u, s), e in ref.ends.items()
    }
    late = conn.execute(
        'SELECT partition, "offset", window_start FROM pgstream.late_records WHERE operator = %s',
        [f"window:{table}"],
    )
    assert sorted((p, off, us(ws)) for p, off, ws in late) == sorted(
        (p, off, round(s, 6)) for p, off, s in ref.late
    )
    dead = {(p, off) for p, off in conn.execute(
        'SELECT partition, "offset" FROM pgstream.dead_letters')}
    assert dead == ref.dead


def us(when: datetime) -> float:
    """A stored timestamp in epoch seconds (microseconds, as stored)."""
    return round(when.timestamp(), 6)


def _merges(lines: list[str]) -> int:
    """How many records bridged two or more sessions (the test must exercise merging)."""
    seen: dict[str, list[list[float]]] = {}
    merges = 0
    for line in lines:
        rec = json.loads(line)
        if not isinstance(rec["ts"], float):
            continue
        t, runs = rec["ts"], seen.setdefault(rec["user"], [])
        joined = [r for r in runs if r[0] - GAP < t < r[1] + GAP]
        merges += len(joined) > 1
        runs[:] = [r for r in runs if r not in joined] + [
            [min([t] + [r[0] for r in joined]), max([t] + [r[1] for r in joined])]
        ]
    return merges


@pytest.mark.parametrize("emit", ["update", "final"])
def test_sessions_match_the_reference_whatever_the_batch_size(
    tmp_path: Path, make_database: Any, emit: str
) -> None:
    lines = session_events(1200, seed=13)
    assert _merges(lines) > 10
    path = tmp_path / "clicks.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    ref = session_reference({"0": list(file_records(lines))}, gap=GAP, grace=GRACE,
                            final=emit == "final")
    assert ref.late and ref.dead and len(ref.windows) > 50
    for batch_size in (1000, 29):
        dsn = make_database()
        with psycopg.connect(dsn, autocommit=True) as conn:
            sink_table(conn)
            run_app(session_app(path, batch_size, emit), dsn, stop_when_idle=True)
            check(conn, ref)
        report = verify_app(session_app(path, batch_size, emit), dsn)
        assert report.ok, report.violations


@pytest.mark.parametrize("emit", ["update", "final"])
def test_a_new_worker_continues_the_committed_sessions(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any], emit: str
) -> None:
    lines = session_events(900, seed=17)
    path = tmp_path / "clicks.jsonl"
    sink_table(pg_conn)
    path.write_text("".join(line + "\n" for line in lines[:400]))
    run_app(session_app(path, 31, emit), pg_dsn, stop_when_idle=True)
    kept = pg_conn.execute("SELECT count(*) FROM pgstream.state").fetchone()
    assert kept is not None and kept[0] > 0
    path.write_text("".join(line + "\n" for line in lines))
    run_app(session_app(path, 31, emit), pg_dsn, stop_when_idle=True)
    ref = session_reference({"0": list(file_records(lines))}, gap=GAP, grace=GRACE,
                            final=emit == "final")
    check(pg_conn, ref)
    assert verify_app(session_app(path, 31, emit), pg_dsn).ok


def test_verify_finds_a_changed_session_row(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    lines = session_events(300, seed=5)
    path = tmp_path / "clicks.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    sink_table(pg_conn)
    app = session_app(path, 40, "update")
    run_app(app, pg_dsn, stop_when_idle=True)
    assert verify_app(app, pg_dsn).ok
    pg_conn.execute(
        "UPDATE sessions SET n = n + 1 "
        "WHERE window_start = (SELECT min(window_start) FROM sessions)"
    )
    assert [v.kind for v in verify_app(app, pg_dsn).violations] == ["wrong-value"]


def test_sessions_over_several_partitions_are_refused_unless_keyed_by_the_split(
    tmp_path: Path,
) -> None:
    app = ps.App("clicks")
    many = app.stream("clicks", ps.FileSource(str(tmp_path / "*.jsonl")))
    with pytest.raises(ConfigError, match=r"session window .* several partitions"):
        many.key_by("user").window(ps.session(gap=60), time="ts").aggregate(
            n=ps.count()
        ).to_table("t")
    split = app.stream("orders", ps.TableSource("public.orders", offset_column="id",
                                                  partitions=4, partition_by="user"))
    split.key_by("user").window(ps.session(gap=60), time="ts").aggregate(
        n=ps.count()
    ).to_table("t2")
    with pytest.raises(ConfigError, match="positive number of seconds"):
        ps.session(gap=0)

"""Event time end to end on a real database: watermarks committed with the batch, late records,
emit="update" and emit="final", hopping windows, each compared with the offline reference of
tests/windowref.py, whatever the batch size, and audited by ``pgstream verify``."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from windowref import Reference, file_records, reference

import pgstream as ps
from pgstream.errors import ConfigError
from pgstream.runtime.worker import run_app
from pgstream.verify import verify_app

UTC = timezone.utc
T0 = 1_700_000_000  # a multiple of 60 and 10


def events(n: int, seed: int, *, bad: bool = True) -> list[str]:
    """JSON lines of users' events, shuffled out of order (mostly a few seconds, sometimes
    minutes late), with a few records whose time is missing or unparsable."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        t = T0 + i * 0.5 - (rng.random() * 200 if rng.random() < 0.1 else rng.random() * 8)
        rec: dict[str, Any] = {"user": f"u{rng.randrange(5)}", "v": rng.randrange(100), "ts": t}
        if bad and rng.random() < 0.01:
            rec["ts"] = rng.choice([None, "yesterday"]) if rng.random() < 0.5 else rec.pop("ts")
        lines.append(json.dumps(rec))
    return lines


def write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def sink_table(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(
        f"CREATE TABLE {name} (user_id text, window_start timestamptz, n bigint, total bigint, "
        "PRIMARY KEY (user_id, window_start))"
    )


def stored(conn: psycopg.Connection[Any], name: str) -> dict[tuple[Any, float], tuple[int, int]]:
    return {
        (u, ws.timestamp()): (n, t)
        for u, ws, n, t in conn.execute(f"SELECT user_id, window_start, n, total FROM {name}")
    }


def late_rows(conn: psycopg.Connection[Any], operator: str) -> list[tuple[str, int, float]]:
    return sorted(
        (p, off, ws.timestamp())
        for p, off, ws in conn.execute(
            'SELECT partition, "offset", window_start FROM pgstream.late_records '
            "WHERE operator = %s",
            [operator],
        )
    )


def windowed_app(path: Path, batch_size: int, **window: Any) -> ps.App:
    app = ps.App("clicks", batch_size=batch_size)
    clicks = app.stream("clicks", ps.FileSource(str(path)))
    kind = window.pop("kind", ps.tumbling(seconds=60))
    table = window.pop("table", "per_minute")
    clicks.key_by("user", name="user_id").window(kind, time="ts", **window).aggregate(
        n=ps.count(), total=ps.sum("v")
    ).to_table(table)
    return app


def final_run(
    path: Path,
    lines: list[str],
    dsn: str,
    conn: psycopg.Connection[Any],
    batch_size: int,
    grace: float,
) -> ps.App:
    """``lines`` in ``path`` through a final-mode ``per_minute`` app (returned), run until
    idle."""
    write(path, lines)
    sink_table(conn, "per_minute")
    app = windowed_app(path, batch_size, grace=grace, emit="final")
    run_app(app, dsn, stop_when_idle=True)
    return app


def check(conn: psycopg.Connection[Any], table: str, ref: Reference) -> None:
    assert stored(conn, table) == ref.windows
    assert late_rows(conn, f"window:{table}") == sorted(
        ("0", off, s) for _, off, s in ref.late
    )
    found = conn.execute('SELECT partition, "offset" FROM pgstream.dead_letters')
    dead = {(p, off) for p, off in found}
    assert dead == ref.dead


@pytest.mark.parametrize("emit", ["update", "final"])
def test_windows_match_the_reference_whatever_the_batch_size(
    tmp_path: Path, make_database: Any, emit: str
) -> None:
    lines = events(1500, seed=7)
    path = tmp_path / "clicks.jsonl"
    write(path, lines)
    ref = reference({"0": list(file_records(lines))}, size=60, grace=20, final=emit == "final")
    assert ref.late and ref.dead and any(not c for c in ref.closed.values())
    results = []
    for batch_size in (1000, 37):
        dsn = make_database()
        with psycopg.connect(dsn, autocommit=True) as conn:
            sink_table(conn, "per_minute")
            run_app(windowed_app(path, batch_size, grace=20, emit=emit), dsn, stop_when_idle=True)
            check(conn, "per_minute", ref)
            mark = conn.execute(
                "SELECT watermark, watermarks FROM pgstream.partitions"
            ).fetchone()
            assert mark is not None
            assert mark[0] == datetime.fromtimestamp(ref.marks["0"], UTC)
            assert mark[1] == {"window:per_minute": ref.marks["0"]}
            results.append(stored(conn, "per_minute"))
        report = verify_app(windowed_app(path, batch_size, grace=20, emit=emit), dsn)
        assert report.ok, report.violations
        assert report.late_records == len(ref.late)


def test_a_new_worker_continues_from_the_committed_watermark_and_open_windows(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    lines = events(1200, seed=11)
    path = tmp_path / "clicks.jsonl"
    sink_table(pg_conn, "per_minute")
    write(path, lines[:500])
    run_app(windowed_app(path, 53, grace=10, emit="final"), pg_dsn, stop_when_idle=True)
    open_windows = pg_conn.execute("SELECT count(*) FROM pgstream.state").fetchone()
    assert open_windows is not None and open_windows[0] > 0
    write(path, lines)
    run_app(windowed_app(path, 53, grace=10, emit="final"), pg_dsn, stop_when_idle=True)
    ref = reference({"0": list(file_records(lines))}, size=60, grace=10, final=True)
    check(pg_conn, "per_minute", ref)
    assert verify_app(windowed_app(path, 53, grace=10, emit="final"), pg_dsn).ok


def test_hopping_windows_and_epoch_milliseconds(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    lines = events(600, seed=3, bad=False)
    ms = [json.dumps({**json.loads(x), "ts": json.loads(x)["ts"] * 1000}) for x in lines]
    path = tmp_path / "clicks.jsonl"
    write(path, ms)
    sink_table(pg_conn, "hops")
    app = windowed_app(
        path, 41, kind=ps.hopping(seconds=60, every=20), grace=5, time_unit="ms", table="hops"
    )
    run_app(app, pg_dsn, stop_when_idle=True)
    ref = reference(
        {"0": list(file_records(ms))}, size=60, every=20, grace=5, scale=1000.0
    )
    assert ref.late
    check(pg_conn, "hops", ref)
    assert verify_app(app, pg_dsn).ok


def test_verify_finds_a_changed_final_row_and_a_lost_late_record(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    lines = events(800, seed=5, bad=False)
    app = final_run(tmp_path / "clicks.jsonl", lines, pg_dsn, pg_conn, 64, grace=15)
    assert verify_app(app, pg_dsn).ok
    pg_conn.execute(
        "DELETE FROM pgstream.late_records WHERE id = (SELECT min(id) FROM pgstream.late_records)"
    )
    pg_conn.execute(
        "UPDATE per_minute SET n = n + 1 "
        "WHERE window_start = (SELECT min(window_start) FROM per_minute)"
    )
    kinds = sorted(v.kind for v in verify_app(app, pg_dsn).violations)
    assert kinds == ["lost", "wrong-value"]


def test_final_over_several_partitions_is_refused_unless_keyed_by_the_split(
    tmp_path: Path,
) -> None:
    app = ps.App("clicks")
    many = app.stream("clicks", ps.FileSource(str(tmp_path / "*.jsonl")))
    with pytest.raises(ConfigError, match="several partitions"):
        many.key_by("user").window(ps.tumbling(seconds=60), time="ts", emit="final").aggregate(
            n=ps.count()
        ).to_table("t")
    split = app.stream("orders", ps.TableSource("public.orders", offset_column="id",
                                                  partitions=4, partition_by="user"))
    split.key_by("user").window(ps.tumbling(seconds=60), time="ts", emit="final").aggregate(
        n=ps.count()
    ).to_table("t2")


def test_several_files_each_keep_their_watermark_and_the_job_watermark_is_the_least(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    (tmp_path / "in").mkdir()
    parts: dict[str, list[str]] = {}
    for f, shift in (("a.jsonl", 0), ("b.jsonl", -300), ("c.jsonl", 120)):
        lines = [
            json.dumps({**json.loads(x), "ts": json.loads(x)["ts"] + shift})
            for x in events(400, seed=len(parts), bad=False)
        ]
        write(tmp_path / "in" / f, lines)
        parts[f] = lines
    sink_table(pg_conn, "per_minute")

    def app(idle: float | None = None) -> ps.App:
        a = ps.App("clicks", batch_size=29)
        s = a.stream("clicks", ps.FileSource(str(tmp_path / "in" / "*.jsonl")))
        s.key_by("user", name="user_id").window(
            ps.tumbling(seconds=60), time="ts", grace=20, idle_timeout=idle
        ).aggregate(n=ps.count(), total=ps.sum("v")).to_table("per_minute")
        return a

    run_app(app(), pg_dsn, stop_when_idle=True)
    ref = reference({p: list(file_records(x)) for p, x in parts.items()}, size=60, grace=20)
    assert stored(pg_conn, "per_minute") == ref.windows
    late = sorted(
        (p, off, ws.timestamp())
        for p, off, ws in pg_conn.execute(
            'SELECT partition, "offset", window_start FROM pgstream.late_records'
        )
    )
    assert late == sorted(ref.late)
    marks = dict(
        pg_conn.execute("SELECT partition, watermark FROM pgstream.window_watermarks").fetchall()
    )
    # (timestamps hold microseconds; the stored epoch seconds are exact)
    assert {p: round(m.timestamp(), 5) for p, m in marks.items()} == {
        p: round(m, 5) for p, m in ref.marks.items()
    }
    job = pg_conn.execute(
        "SELECT watermark, partitions, idle_partitions FROM pgstream.job_watermarks "
        "WHERE job = 'clicks' AND operator = 'window:per_minute'"
    ).fetchone()
    assert job is not None
    assert (round(job[0].timestamp(), 5), job[1], job[2]) == (
        round(min(ref.marks.values()), 5), 3, 0
    )
    # the documented reader's condition: a window is final once end + grace < job watermark
    final = pg_conn.execute(
        "SELECT count(*) FROM per_minute w, pgstream.job_watermarks j "
        "WHERE j.job = 'clicks' AND j.operator = 'window:per_minute' "
        "AND w.window_start + interval '60 s' + interval '20 s' < j.watermark"
    ).fetchone()
    low = min(ref.marks.values())
    assert final is not None and final[0] == sum(1 for _, s in ref.windows if s + 80 < low)
    assert verify_app(app(), pg_dsn).ok
    # with an idle timeout the partitions that stopped committing no longer hold it back:
    # all idle, the job watermark is the largest
    pg_conn.execute("UPDATE pgstream.partitions SET last_commit_at = now() - interval '1 hour'")
    run_app(app(idle=60), pg_dsn, stop_when_idle=True, accept_changes=True)
    job = pg_conn.execute(
        "SELECT watermark, idle_partitions FROM pgstream.job_watermarks WHERE job = 'clicks'"
    ).fetchone()
    assert job is not None
    assert (round(job[0].timestamp(), 5), job[1]) == (round(max(ref.marks.values()), 5), 3)
    # pgstream status shows the partitions' watermarks and the job's
    from click.testing import CliRunner

    from pgstream.cli import main

    shown = CliRunner().invoke(main, ["status", "--dsn", pg_dsn])
    assert shown.exit_code == 0, shown.output
    assert "window:per_minute: job watermark" in shown.output


def test_a_reset_stream_forgets_its_watermarks_open_windows_and_late_records(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    from pgstream.admin import reset

    lines = events(700, seed=13, bad=False)
    path = tmp_path / "clicks.jsonl"
    app = final_run(path, lines, pg_dsn, pg_conn, 50, grace=10)
    with psycopg.connect(pg_dsn) as conn:
        outcome = reset(conn, app, "clicks", delete_outputs=False, apply=True)
    assert "open windows" in "\n".join(outcome.lines)
    row = pg_conn.execute(
        "SELECT (SELECT count(*) FROM pgstream.state), (SELECT count(*) FROM "
        "pgstream.late_records), (SELECT watermarks FROM pgstream.partitions)"
    ).fetchone()
    assert row == (0, 0, None)
    pg_conn.execute("TRUNCATE per_minute")
    run_app(windowed_app(path, 50, grace=10, emit="final"), pg_dsn, stop_when_idle=True)
    ref = reference({"0": list(file_records(lines))}, size=60, grace=10, final=True)
    check(pg_conn, "per_minute", ref)

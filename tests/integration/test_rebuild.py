"""``pgstream rebuild`` (issue 10 part 5), through the real command line and real processes.

The app and the references are in ``tests/rebuildref.py``: after a rebuild every rebuilt table
holds exactly what today's code makes of the whole input, the others are untouched, and
``pgstream verify`` is clean.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
from rebuildref import (
    append,
    assert_tables,
    dead_offsets,
    failing,
    file_records,
    leftovers,
    rebuild,
    reference,
    run,
    setup,
    tables,
    verify_clean,
)


def test_rebuild_after_a_logic_change_gives_the_new_code_s_outputs(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = setup(tmp_path, pg_conn, 600)
    run(tmp_path, env, pg_dsn)
    assert_tables(pg_conn, reference(file_records(data), v2=False))
    v2 = {**env, "REBUILDAPP_V2": "1"}
    # today's code is not the job's plan: refused, naming --accept-changes
    refused = rebuild(tmp_path, v2, pg_dsn, "--yes", check=False)
    assert refused.returncode != 0 and "--accept-changes" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    # version 2 is recorded and runs on new input: the tables now mix both versions
    data = append(tmp_path, 600, 300)
    run(tmp_path, v2, pg_dsn, "--accept-changes")
    mixed = tables(pg_conn)
    assert mixed["facts"] != reference(file_records(data), v2=True)["facts"]
    # a dry run says what it would do and changes nothing
    dry = rebuild(tmp_path, v2, pg_dsn).stdout
    assert "dry run" in dry and "rebuild sink facts" in dry and "stream events" in dry, dry
    assert f"live committed offset {len(data)}" in dry, dry
    assert tables(pg_conn) == mixed and leftovers(pg_conn) == 0
    # the rebuild: every table is what version 2 makes of the whole input
    out = rebuild(tmp_path, v2, pg_dsn, "--yes")
    assert "swapped in" in out.stdout, out.stdout + out.stderr
    assert_tables(pg_conn, reference(file_records(data), v2=True))
    assert dead_offsets(pg_conn) == failing(file_records(data))
    assert leftovers(pg_conn) == 0
    verify_clean(tmp_path, v2, pg_dsn)
    # the job goes on from the same offsets with the moved state and watermarks
    data = append(tmp_path, 900, 200)
    run(tmp_path, v2, pg_dsn)
    assert_tables(pg_conn, reference(file_records(data), v2=True))
    verify_clean(tmp_path, v2, pg_dsn)


def test_a_new_sink_gets_its_history_and_the_others_stay(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = setup(tmp_path, pg_conn, 500)
    run(tmp_path, env, pg_dsn)
    # a sink is added: recorded with --accept-changes, it sees only the input after it
    tops = {**env, "REBUILDAPP_TOPS": "1"}
    first = len(data)
    data = append(tmp_path, 500, 150)
    run(tmp_path, tops, pg_dsn, "--accept-changes")
    later = [(off, r) for off, r in file_records(data) if off >= first]
    assert tables(pg_conn)["tops"] == reference(later, v2=False)["tops"]
    before = tables(pg_conn)
    ledger = pg_conn.execute(
        "SELECT start_offset, end_offset, plan_version FROM pgstream.batches ORDER BY 1"
    ).fetchall()
    out = rebuild(tmp_path, tops, pg_dsn, "--sink", "tops", "--yes")
    assert "tops: swapped in" in out.stdout, out.stdout + out.stderr
    after = tables(pg_conn)
    assert after["tops"] == reference(file_records(data), v2=False)["tops"]
    for name in ("facts", "totals", "folds", "minutes"):
        assert after[name] == before[name], f"{name} changed"
    assert (
        pg_conn.execute(
            "SELECT start_offset, end_offset, plan_version FROM pgstream.batches ORDER BY 1"
        ).fetchall()
        == ledger
    )
    assert leftovers(pg_conn) == 0
    verify_clean(tmp_path, tops, pg_dsn)
    data = append(tmp_path, 650, 100)
    run(tmp_path, tops, pg_dsn)
    assert_tables(pg_conn, reference(file_records(data), v2=False), (*before, "tops"))
    verify_clean(tmp_path, tops, pg_dsn)


def test_a_concurrent_reader_sees_the_old_or_the_new_table_never_a_mix(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = setup(tmp_path, pg_conn, 800)
    run(tmp_path, env, pg_dsn)
    v2 = {**env, "REBUILDAPP_V2": "1"}
    run(tmp_path, v2, pg_dsn, "--accept-changes")
    old = _observe(pg_conn)
    new_facts = reference(file_records(data), v2=True)["facts"]
    new = (sum(new_facts.values()), sum(k[2] * c for k, c in new_facts.items()))
    assert old != new
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                while not stop.is_set():
                    seen.append(_observe(conn))
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rebuild(tmp_path, v2, pg_dsn, "--yes")
        seen_at_swap = len(seen)
        while len(seen) < seen_at_swap + 5 and reader.is_alive():
            stop.wait(0.01)
    finally:
        stop.set()
        reader.join(timeout=30)
    assert not errors, errors[0]
    mixed = [s for s in seen if s not in (old, new)]
    assert not mixed, f"{len(mixed)} of {len(seen)} observations were neither: {mixed[:3]}"
    assert seen[0] == old and seen[-1] == new


def _observe(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute("SELECT count(*), coalesce(sum(cents), 0) FROM facts").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_refusals_name_the_problem_and_change_nothing(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = setup(tmp_path, pg_conn, 200, REBUILDAPP_HANDLER="1")
    run(tmp_path, env, pg_dsn)
    before = tables(pg_conn)
    # a whole-app rebuild of an app with @app.batch handlers
    done = rebuild(tmp_path, env, pg_dsn, "--yes", check=False)
    assert done.returncode == 2 and "@app.batch handlers (audit)" in done.stderr, done.stderr
    assert "--sink" in done.stderr and "Traceback" not in done.stderr
    # an unknown sink
    done = rebuild(tmp_path, env, pg_dsn, "--sink", "nope", "--yes", check=False)
    assert done.returncode == 2 and "no sink 'nope'" in done.stderr, done.stderr
    assert "facts" in done.stderr
    assert tables(pg_conn) == before and leftovers(pg_conn) == 0
    # another rebuild of the job is running (it holds the job's rebuild lock)
    pg_conn.execute("SELECT pg_advisory_lock(hashtext('pgstream.rebuild'), hashtext('rebuildjob'))")
    done = rebuild(tmp_path, env, pg_dsn, "--sink", "folds", "--yes", check=False)
    assert done.returncode == 1 and "another `pgstream rebuild`" in done.stderr, done.stderr
    pg_conn.execute(
        "SELECT pg_advisory_unlock(hashtext('pgstream.rebuild'), hashtext('rebuildjob'))"
    )
    # a stream with a handler is rebuilt in part: its ledger stays, the sink is exact
    ledger = pg_conn.execute("SELECT count(*) FROM pgstream.batches").fetchone()
    rebuild(tmp_path, env, pg_dsn, "--sink", "folds", "--yes")
    assert pg_conn.execute("SELECT count(*) FROM pgstream.batches").fetchone() == ledger
    assert_tables(pg_conn, reference(file_records(data), v2=False))
    verify_clean(tmp_path, env, pg_dsn)


def test_a_view_on_a_sink_blocks_the_drop_until_keep_old(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = setup(tmp_path, pg_conn, 300)
    run(tmp_path, env, pg_dsn)
    v2 = {**env, "REBUILDAPP_V2": "1"}
    run(tmp_path, v2, pg_dsn, "--accept-changes")
    pg_conn.execute("CREATE VIEW big_totals AS SELECT * FROM totals WHERE total > 0")
    before = tables(pg_conn)
    done = rebuild(tmp_path, v2, pg_dsn, "--yes", check=False)
    assert done.returncode == 2 and "--keep-old" in done.stderr, done.stderr
    assert "cannot be dropped" in done.stderr and "Traceback" not in done.stderr
    assert tables(pg_conn) == before
    out = rebuild(tmp_path, v2, pg_dsn, "--yes", "--keep-old").stdout
    assert "kept as totals__old" in out, out
    assert_tables(pg_conn, reference(file_records(data), v2=True))
    # the view binds to the old table, which is kept as it was
    old = pg_conn.execute("SELECT sum(n) FROM totals__old").fetchone()
    assert old is not None and int(old[0]) == sum(n for n, _ in before["totals"].values())
    view = pg_conn.execute("SELECT count(*) FROM big_totals").fetchone()
    assert view is not None
    assert view[0] == sum(1 for _, t in before["totals"].values() if t > 0)
    verify_clean(tmp_path, v2, pg_dsn)
    # a later rebuild refuses while the kept table is in the way
    done = rebuild(tmp_path, v2, pg_dsn, "--yes", check=False)
    assert done.returncode == 2 and "facts__old exists" in done.stderr, done.stderr
    assert "catch-up" not in done.stderr  # refused before it starts


def test_a_sink_rebuild_refuses_records_its_new_code_sets_aside(
    tmp_path: Path, pg_dsn: str, pg_conn: psycopg.Connection[Any]
) -> None:
    env, data = setup(tmp_path, pg_conn, 200)
    run(tmp_path, env, pg_dsn)
    v2 = {**env, "REBUILDAPP_V2": "1"}
    run(tmp_path, v2, pg_dsn, "--accept-changes")
    before = tables(pg_conn)
    done = rebuild(tmp_path, v2, pg_dsn, "--sink", "facts", "--yes", check=False)
    first = failing(file_records(data))[0]
    assert done.returncode == 1 and f"events/0 offset {first}: " in done.stderr, done.stderr
    assert "rebuild every sink of the stream" in done.stderr
    assert tables(pg_conn) == before and dead_offsets(pg_conn) == []
    # --restart with another selection drops the refused attempt's shadow tables too
    rebuild(tmp_path, v2, pg_dsn, "--sink", "minutes", "--restart", "--yes")
    assert leftovers(pg_conn) == 0
    # the whole stream's rebuild takes the new dead letters over
    rebuild(tmp_path, v2, pg_dsn, "--yes")
    assert_tables(pg_conn, reference(file_records(data), v2=True))
    assert dead_offsets(pg_conn) == failing(file_records(data))
    verify_clean(tmp_path, v2, pg_dsn)

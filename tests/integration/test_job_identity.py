"""Job identity and plan changes (issue 11 items 1-3), as a user meets them on the command line:
renames, two apps sharing names, a sink added or a map changed, racing and fenced workers."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proctools import run_cli

import pgstream as ps
from pgstream.db.connect import connect
from pgstream.runtime.jobcheck import PlanChangedError, check_job
from pgstream.runtime.worker import Worker

HEADER = """
import os
import pgstream as ps

app = ps.App({job!r}, batch_size=100)
orders = app.stream({stream!r}, ps.FileSource(os.environ["ORDERS"]))
"""
IDS = 'orders.map(lambda o: {"id": o["id"], "cents": o["amount"] * 100}).to_table("ids")\n'
IDS_X1000 = 'orders.map(lambda o: {"id": o["id"], "cents": o["amount"] * 1000}).to_table("ids")\n'
PER_USER = 'orders.key_by("user").aggregate(n=ps.count(), total=ps.sum("amount"))' \
    '.to_table("per_user")\n'


def write_app(tmp_path: Path, *lines: str, job: str = "shop", stream: str = "orders") -> None:
    (tmp_path / "app.py").write_text(HEADER.format(job=job, stream=stream) + "".join(lines))


def add_orders(path: Path, start: int, n: int) -> None:
    with path.open("a") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": i, "user": i % 7, "amount": i % 5 + 1}) + "\n")


def pgstream(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env={**os.environ, **env})


def run(
    tmp_path: Path, dsn: str, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return pgstream(
        "run", "app:app", "--dsn", dsn, "--stop-when-idle", *extra, cwd=tmp_path, env=env
    )


def setup_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE ids (id bigint, cents bigint, _source text, _partition text,"
        " _offset bigint, _seq int, UNIQUE (_source, _partition, _offset, _seq));"
        'CREATE TABLE per_user ("user" int PRIMARY KEY, n bigint, total bigint)'
    )


@pytest.fixture
def env(tmp_path: Path, pg_conn: psycopg.Connection[Any]) -> dict[str, str]:
    setup_tables(pg_conn)
    orders = tmp_path / "orders.jsonl"
    add_orders(orders, 0, 300)
    return {"ORDERS": str(orders)}


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def count(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_renamed_stream_is_refused_with_the_rename_hint(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, env: dict[str, str]
) -> None:
    write_app(tmp_path, IDS, PER_USER)
    assert run(tmp_path, pg_dsn, env).returncode == 0
    write_app(tmp_path, IDS, PER_USER, stream="orders_v2")
    refused(
        run(tmp_path, pg_dsn, env),
        "stream 'orders' is gone and the new stream 'orders_v2' reads the same source",
        "run `pgstream job rename app:app --stream orders=orders_v2` first, which keeps its "
        "offsets",
        "--accept-changes",
    )
    assert count(pg_conn, "SELECT count(*) FROM ids") == 300
    assert count(pg_conn, "SELECT sum(n) FROM per_user") == 300
    assert count(pg_conn, "SELECT count(*) FROM pgstream.partitions WHERE source <> 'orders'") == 0


def test_renamed_app_is_refused_as_a_new_job_writing_another_jobs_tables(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, env: dict[str, str]
) -> None:
    write_app(tmp_path, IDS, PER_USER)
    assert run(tmp_path, pg_dsn, env).returncode == 0
    write_app(tmp_path, IDS, PER_USER, job="shop2")
    refused(
        run(tmp_path, pg_dsn, env),
        "job 'shop2' is new but job 'shop' already writes ids, per_user: if you renamed the App "
        "run `pgstream job rename app:app --from-job shop` (keeps offsets); two jobs writing one "
        "table count every record twice",
    )
    assert count(pg_conn, "SELECT sum(n) FROM per_user") == 300
    assert count(pg_conn, "SELECT count(*) FROM pgstream.jobs") == 1
    assert count(pg_conn, "SELECT count(*) FROM pgstream.partitions WHERE job = 'shop2'") == 0


TABLE_APP = """
import os
import pgstream as ps

app = ps.App("shop", batch_size=20)
orders = app.stream("orders", ps.TableSource(os.environ["TABLE"], offset_column="id"))
orders.map(lambda o: {{"id": o["id"]}}).to_table({sink!r})
"""


def test_two_apps_with_the_same_names_over_different_tables_are_refused(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    pg_conn.execute(
        "CREATE TABLE small (id bigserial PRIMARY KEY, x int);"
        "CREATE TABLE big (id bigserial PRIMARY KEY, x int);"
        "INSERT INTO small (x) SELECT g FROM generate_series(1, 50) g;"
        "INSERT INTO big (x) SELECT g FROM generate_series(1, 150) g;"
    )
    for sink in ("out_small", "out_big"):
        pg_conn.execute(
            f"CREATE TABLE {sink} (id bigint, _source text, _partition text, _offset bigint,"
            " _seq int, UNIQUE (_source, _partition, _offset, _seq))"
        )
    (tmp_path / "app.py").write_text(TABLE_APP.format(sink="out_small"))
    assert run(tmp_path, pg_dsn, {"TABLE": "public.small"}).returncode == 0
    assert count(pg_conn, "SELECT count(*) FROM out_small") == 50
    (tmp_path / "app.py").write_text(TABLE_APP.format(sink="out_big"))
    for extra in ((), ("--accept-changes",)):
        refused(
            run(tmp_path, pg_dsn, {"TABLE": "public.big"}, *extra),
            "stream 'orders' of job 'shop' has a checkpoint for table public.small offset id, "
            "but the app now reads table public.big offset id",
            "give the App another name",
            "pgstream job reset app:app --stream orders",
        )
        assert count(pg_conn, "SELECT count(*) FROM out_big") == 0
    assert count(pg_conn, "SELECT version FROM pgstream.jobs") == 1


def verify(tmp_path: Path, dsn: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return pgstream("verify", "app:app", "--dsn", dsn, cwd=tmp_path, env=env)


def test_added_sink_is_refused_then_accepted_and_gets_only_new_records(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, env: dict[str, str]
) -> None:
    write_app(tmp_path, IDS)
    assert run(tmp_path, pg_dsn, env).returncode == 0
    write_app(tmp_path, IDS, PER_USER)
    refused(
        run(tmp_path, pg_dsn, env),
        "the plan of job 'shop' changed since plan version 1",
        "new sink per_user (aggregate from stream 'orders'): starts empty: it gets only records "
        "after this point, not history",
        "pgstream run app:app --accept-changes",
    )
    assert count(pg_conn, "SELECT count(*) FROM per_user") == 0
    add_orders(Path(env["ORDERS"]), 300, 200)
    done = run(tmp_path, pg_dsn, env, "--accept-changes")
    assert done.returncode == 0, done.stderr
    assert count(pg_conn, "SELECT count(*) FROM ids") == 500
    assert count(pg_conn, "SELECT sum(n) FROM per_user") == 200
    assert pg_conn.execute(
        "SELECT version, accepted_by IS NOT NULL, changes FROM pgstream.plan_versions "
        "WHERE version = 2"
    ).fetchone() == (2, True, "new sink per_user (aggregate from stream 'orders'): starts "
                     "empty: it gets only records after this point, not history")
    assert count(pg_conn, "SELECT count(*) FROM pgstream.batches WHERE plan_version IS NULL") == 0
    checked = verify(tmp_path, pg_dsn, env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "not checked" not in checked.stdout
    assert "verify shop: clean" in checked.stdout
    assert run(tmp_path, pg_dsn, env).returncode == 0  # the accepted plan now simply runs


def test_changed_map_is_refused_then_accepted_and_verify_names_what_it_cannot_check(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, env: dict[str, str]
) -> None:
    write_app(tmp_path, IDS, PER_USER)
    assert run(tmp_path, pg_dsn, env).returncode == 0
    write_app(tmp_path, IDS_X1000, PER_USER)
    refused(
        run(tmp_path, pg_dsn, env),
        "the map/filter/flat_map code feeding ids changed: rows already written keep the old "
        "logic",
    )
    add_orders(Path(env["ORDERS"]), 300, 100)
    assert run(tmp_path, pg_dsn, env, "--accept-changes").returncode == 0
    assert count(pg_conn, "SELECT count(DISTINCT cents / (1 + id % 5)) FROM ids") == 2

    checked = verify(tmp_path, pg_dsn, env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "wrong-value" not in checked.stdout
    assert "not checked: ids orders/0 [0, " in checked.stdout, checked.stdout
    assert "ran under plan version 1 (changes: the map/filter/flat_map code feeding ids" \
        in checked.stdout
    as_json = pgstream("verify", "app:app", "--dsn", pg_dsn, "--json", cwd=tmp_path, env=env)
    report = json.loads(as_json.stdout)
    assert report["ok"] is True and report["counts"]["wrong-value"] == 0
    assert any("plan version 1" in note for note in report["unchecked"])

    # code of the older version refuses to start: it is an old deployment
    write_app(tmp_path, IDS, PER_USER)
    refused(
        run(tmp_path, pg_dsn, env),
        "this code is plan version 1 of job 'shop', but version 2 has been accepted since",
    )


def test_workers_starting_at_once_record_one_version(pg_dsn: str, pg_conn: Any) -> None:
    app = ps.App("race")
    app.stream("orders", ps.FileSource(os.devnull))
    n = 6
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []
    versions: list[int] = []

    def start() -> None:
        with connect(pg_dsn, autocommit=True) as conn:
            barrier.wait()
            try:
                versions.append(check_job(conn, app, lambda _c: None).version)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and versions == [1] * n
    assert count(pg_conn, "SELECT count(*) FROM pgstream.plan_versions") == 1


def file_app(path: Path, factor: int) -> ps.App:
    app = ps.App("fence", batch_size=10, lease_seconds=1.5, poll_interval=0.05)
    orders = app.stream("orders", ps.FileSource(path))
    # two lambdas in the source: a value captured by a closure is not part of the plan
    if factor == 100:
        orders.map(lambda o: {"id": o["id"], "cents": o["amount"] * 100}).to_table("ids")
    else:
        orders.map(lambda o: {"id": o["id"], "cents": o["amount"] * 1000}).to_table("ids")
    return app


def test_a_worker_running_the_old_code_is_fenced_after_a_change_is_accepted(
    tmp_path: Path, pg_dsn: str, pg_conn: Any
) -> None:
    setup_tables(pg_conn)
    path = tmp_path / "orders.jsonl"
    add_orders(path, 0, 100)
    old = Worker(file_app(path, 100), pg_dsn, install_signal_handlers=False)
    failure: list[BaseException] = []

    def run_old() -> None:
        try:
            old.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run_old)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while count(pg_conn, "SELECT count(*) FROM ids") < 100:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        new_app = file_app(path, 1000)
        with pytest.raises(PlanChangedError, match="changed since plan version 1"):
            check_job(pg_conn, new_app, lambda _c: None)
        assert check_job(pg_conn, new_app, lambda _c: None, accept_changes=True).version == 2
        add_orders(path, 100, 100)  # the old worker sees them first: it must not commit them
        thread.join(timeout=30)
        assert not thread.is_alive()
        summary = Worker(new_app, pg_dsn, install_signal_handlers=False, stop_when_idle=True).run()
        assert summary.records == 100
    finally:
        old.stop()
        thread.join(timeout=30)
    assert len(failure) == 1 and isinstance(failure[0], PlanChangedError), failure
    assert "now runs plan version 2" in str(failure[0])
    # every record after the acceptance was written by the new code, none by the old one
    assert pg_conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE cents = (1 + id % 5) * 1000) FROM ids "
        "WHERE id >= 100"
    ).fetchone() == (100, 100)
    assert pg_conn.execute(
        "SELECT plan_version, count(*), sum(records_in) FROM pgstream.batches "
        "GROUP BY plan_version ORDER BY plan_version"
    ).fetchall()[1][2] == 100


def test_a_job_from_before_plan_tracking_adopts_its_plan(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    setup_tables(pg_conn)
    path = tmp_path / "orders.jsonl"
    add_orders(path, 0, 100)
    Worker(file_app(path, 100), pg_dsn, install_signal_handlers=False, stop_when_idle=True).run()
    # what a job run before revision 0002 looks like: no plan, no identities, no versions
    pg_conn.execute(
        "DELETE FROM pgstream.jobs; UPDATE pgstream.partitions SET source_identity = NULL;"
        "UPDATE pgstream.batches SET plan_version = NULL"
    )
    add_orders(path, 100, 50)
    app = file_app(path, 100)
    Worker(app, pg_dsn, install_signal_handlers=False, stop_when_idle=True).run()
    assert "checkpoints from before plan tracking" in caplog.text
    assert pg_conn.execute(
        "SELECT version, changes LIKE 'adopted:%' FROM pgstream.plan_versions"
    ).fetchall() == [(1, True)]
    assert count(pg_conn, "SELECT source_identity FROM pgstream.partitions") == (
        f"file {path.resolve()}"
    )
    from pgstream.verify import verify_app

    report = verify_app(app, pg_dsn)
    assert report.ok, [v.describe() for v in report.violations]
    assert any(
        "ids orders/0 [0, " in note and "before the job's plan was recorded" in note
        for note in report.unchecked
    ), report.unchecked


def test_workers_accept_a_change_once(
    tmp_path: Path, pg_dsn: str, pg_conn: Any, env: dict[str, str]
) -> None:
    write_app(tmp_path, IDS)
    assert run(tmp_path, pg_dsn, env).returncode == 0
    write_app(tmp_path, IDS, PER_USER)
    add_orders(Path(env["ORDERS"]), 300, 100)
    done = run(tmp_path, pg_dsn, env, "--workers", "2", "--accept-changes")
    assert done.returncode == 0, done.stderr
    assert pg_conn.execute(
        "SELECT version FROM pgstream.plan_versions ORDER BY version"
    ).fetchall() == [(1,), (2,)]
    assert count(pg_conn, "SELECT sum(n) FROM per_user") == 100
    assert count(pg_conn, "SELECT count(*) FROM ids") == 400

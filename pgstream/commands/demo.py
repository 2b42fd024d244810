"""``pgstream demo``: an exactly-once pipeline end to end, with a crash in the middle.

It picks the database (embedded by default), migrates it, recreates the demo's sink tables,
generates the input, runs ``pgstream run pgstream.demo.app:app`` as a subprocess, SIGKILLs it
part-way and starts another that resumes from the checkpoint, then reads the results back
with SQL and checks them against a reference computed from the input.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pgstream.cli import dsn_option
from pgstream.demo import INPUT_ENV, JOB

TARGET = "pgstream.demo.app:app"
CRASH_AT = 0.4  # kill the first worker once this share of the records is committed
POLL = 0.05



@dataclass(slots=True)
class Run:
    """Wall time and what happened while the workers ran."""

    seconds: float = 0.0
    killed_pid: int | None = None
    killed_offset: int | None = None
    killed_records: int = 0


@click.command("demo")
@dsn_option
@click.option(
    "--events",
    type=click.IntRange(min=100),
    default=200_000,
    show_default=True,
    help="Orders to generate.",
)
@click.option("--no-crash", is_flag=True, help="Do not kill -9 the worker part-way.")
def command(dsn: str | None, events: int, no_crash: bool) -> None:
    """Run a demo pipeline end to end: orders from a file into three SQL tables, exactly
    once, with a kill -9 in the middle; then check the results against the input.

    Uses the embedded PostgreSQL unless a database is given. Each run drops and recreates
    the demo_* tables and the pgstream-demo job's rows in that database."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the worker too, as Ctrl-C does
    ok = Demo(console, events, crash=not no_crash).run(dsn)
    sys.exit(0 if ok else 1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Demo:
    """One demo run, printing as it goes."""

    def __init__(self, console: Console, events: int, *, crash: bool) -> None:
        self.console = console
        self.events = events
        self.crash = crash
        self.origin = "embedded"

    def say(self, label: str, text: str) -> None:
        """One aligned ``label  text`` line."""
        self.console.print(f"[bold]{label:<9}[/] {text}")

    def run(self, cli_dsn: str | None) -> bool:
        """The whole demo; True when the exactly-once check passed."""
        from pgstream.db import migrate
        from pgstream.db.embedded import home_dir
        from pgstream.demo import data, setup

        c = self.console
        c.print(
            "[bold]pgstream demo[/]: exactly-once stream processing, PostgreSQL is the checkpoint"
        )
        c.print()
        dsn = self.database(cli_dsn)
        before = migrate.current(dsn)
        migrate.upgrade(dsn)
        after = migrate.current(dsn)
        if before == after:
            self.say("schema", f"pgstream schema at revision {after} (up to date)")
        else:
            self.say("schema", f"pgstream db upgrade: {before or 'empty'} -> {after}")
        setup.reset(dsn)
        self.say("tables", "demo_order_facts, demo_user_totals, demo_user_last (recreated)")
        self.say("", "[dim]pgstream/demo/schema.py; in your project: your Alembic migration[/]")

        workdir = home_dir() / "demo"
        path = workdir / "orders.jsonl"
        data.generate(path, self.events)
        size = path.stat().st_size
        self.say("input", f"{self.events:,} orders, 2 of them malformed ({size / 1e6:.1f} MB)")
        self.say("", f"[dim]{path}[/]")
        self.say("job", f"pgstream run {TARGET}")
        self.say("", "[dim]filter+map -> append, key_by+aggregate -> upsert, fold -> upsert[/]")
        c.print()

        with ThreadPoolExecutor(1) as pool:
            reference: Future[data.Expected] = pool.submit(data.expected, path)
            run = self.process(dsn, path, workdir)
            ref = reference.result()
        return self.report(dsn, ref, run)

    # -- database ------------------------------------------------------------------------------

    def database(self, cli_dsn: str | None) -> str:
        """Resolve the DSN like every command, saying where it came from."""
        from pgstream.db.connect import ENV_VARS, describe_dsn, resolve_dsn

        origin = "--dsn" if cli_dsn and cli_dsn.strip() else None
        for var in ENV_VARS:
            if origin is None and os.environ.get(var, "").strip():
                origin = f"${var}"
        if origin is not None:
            self.origin = origin
            dsn = resolve_dsn(cli_dsn)
            self.say("database", f"{describe_dsn(dsn)} [dim](from {origin})[/]")
            return dsn
        from pgstream.db.embedded import data_dir

        with self.console.status("starting the embedded PostgreSQL (first start: a few seconds)"):
            dsn = resolve_dsn(None)
        from pgstream.db.connect import connect

        with connect(dsn) as conn:
            version = conn.info.parameter_status("server_version") or "?"
        self.say("database", f"embedded PostgreSQL {version} (pgserver, no server to install)")
        self.say("", f"[dim]data in {data_dir()}[/]")
        return dsn

    # -- the job -------------------------------------------------------------------------------

    def process(self, dsn: str, path: Path, workdir: Path) -> Run:
        """Run the job in worker subprocesses with a progress bar; kill -9 the first one."""
        from pgstream.db import queries
        from pgstream.db.connect import connect

        run = Run()
        total = self.events
        batch = max(200, min(10_000, total // 25))
        progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>9,.0f}/{task.total:,.0f} records"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        with connect(dsn, autocommit=True) as conn, progress:
            task = progress.add_task("processing", total=total, rate="")
            started = time.monotonic()

            def poll() -> tuple[int, int | None]:
                row = conn.execute(queries.DEMO_PROGRESS, {"job": JOB}).fetchone()
                records, offset = row or (0, None)
                elapsed = time.monotonic() - started
                rate = f"{records / elapsed:>9,.0f}/s" if elapsed > 0 else ""
                progress.update(task, completed=records, rate=rate)
                return int(records), offset

            if self.crash:
                with self.worker(dsn, path, workdir / "worker-1.log", batch) as proc:
                    records, offset = poll()
                    while proc.poll() is None and records < total * CRASH_AT:
                        time.sleep(POLL)
                        records, offset = poll()
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait()
                        records, offset = poll()
                        run.killed_pid, run.killed_offset = proc.pid, offset
                        run.killed_records = records
                        lost = (
                            "the batch in flight is lost"
                            if records < total
                            else "all of them: it was about to exit"
                        )
                        progress.console.print(
                            f"[bold red]simulating a crash:[/] kill -9 worker pid {proc.pid} "
                            f"at offset {offset or 0:,}\n"
                            f"  ({records:,} records committed; {lost})\n"
                            "[bold]restarting:[/] a new worker resumes from the checkpoint "
                            f"at offset {offset or 0:,}"
                        )
                    else:
                        self.check_exit(proc, workdir / "worker-1.log")
                        progress.console.print(
                            "[yellow]the worker finished before the crash point; no crash[/]"
                        )
            with self.worker(dsn, path, workdir / "worker-2.log", batch) as proc:
                while proc.poll() is None:
                    time.sleep(POLL)
                    poll()
                self.check_exit(proc, workdir / "worker-2.log")
            poll()
            run.seconds = time.monotonic() - started
        return run

    @contextmanager
    def worker(
        self, dsn: str, path: Path, log: Path, batch: int
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A ``pgstream run`` subprocess, stopped if the demo is interrupted."""
        args = [sys.executable, "-m", "pgstream", "run", TARGET, "--dsn", dsn]
        args += ["--stop-when-idle", "--batch-size", str(batch)]
        env = {**os.environ, INPUT_ENV: str(path)}
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()

    def check_exit(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        """Stop the demo with the worker's own output if it failed."""
        if proc.returncode == 0:
            return
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        from pgstream.errors import PgStreamError

        detail = "\n".join(tail) or "(no output)"
        raise PgStreamError(
            f"the demo worker exited with status {proc.returncode}:\n{detail}",
            hint=f"full output in {log}",
        )

    # -- results -------------------------------------------------------------------------------

    def report(self, dsn: str, ref: Any, run: Run) -> bool:
        """Print the result table, the exactly-once check, the throughput and the psql hint."""
        from pgstream.db.connect import connect, safe_dsn
        from pgstream.demo.check import QUERY_HINT, run_checks, steady_rate, top_users

        c = self.console
        with connect(dsn, autocommit=True) as conn:
            rows = top_users(conn)
            checks = run_checks(conn, ref)
            steady = steady_rate(conn)
        c.print()
        table = Table(title="top users by paid total [dim](read back with SQL)[/]")
        for name in ("user", "paid orders", "total €", "avg €", "orders", "last order", "streak"):
            table.add_column(name, justify="left" if name in ("user", "last order") else "right")
        for user, n, total, avg, orders, last_at, streak in rows:
            table.add_row(
                user,
                f"{n:,}",
                f"{total / 100:,.2f}",
                f"{avg / 100:,.2f}",
                f"{orders:,}" if orders is not None else "-",
                last_at.strftime("%m-%d %H:%M") if last_at else "-",
                str(streak) if streak is not None else "-",
            )
        c.print(table)
        c.print()
        c.print("[bold]exactly-once check[/] [dim](SQL vs. a reference computed from the input)[/]")
        for chk in checks:
            mark = "[green]✓[/]" if chk.ok else "[red]✗ MISMATCH[/]"
            c.print(f"  {chk.text} {mark}")
        if run.killed_pid is not None:
            c.print(
                f"  kill -9 at offset {run.killed_offset or 0:,}: nothing lost, nothing twice"
                + (" [green]✓[/]" if all(ch.ok for ch in checks) else " [red]✗[/]")
            )
        c.print()
        rate = ref.lines / run.seconds if run.seconds > 0 else 0.0
        starts = "2 worker starts + recovery" if run.killed_pid else "worker start"
        c.print(
            f"[bold]throughput[/] {rate:>7,.0f} records/s end to end "
            f"({ref.lines:,} in {run.seconds:.1f} s incl. {starts})"
        )
        if steady:
            c.print(f"           {steady:>7,.0f} records/s between checkpoints (ledger)")
        c.print()
        shown = safe_dsn(dsn)
        c.print("[bold]query it yourself[/]")
        psql = "psql" if shutil.which("psql") else None
        c.print(f"  psql \"{shown}\" -c '{QUERY_HINT}'", soft_wrap=True)
        if psql is None:
            c.print("  [dim](no psql on PATH: any PostgreSQL client works with that DSN)[/]")
        dsn_arg = f' --dsn "{shown}"' if self.origin == "--dsn" else ""
        c.print(f"  pgstream status{dsn_arg}", soft_wrap=True)
        if importlib.util.find_spec("pgstream.commands.verify") is not None:
            c.print(f"  pgstream verify {TARGET}{dsn_arg}", soft_wrap=True)
        ok = all(ch.ok for ch in checks)
        if not ok:
            c.print("[bold red]the exactly-once check FAILED[/]")
        return ok

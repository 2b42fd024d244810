"""A Hypothesis stateful test of the checkpoint protocol (issue 3 part 8).

The model is the input file itself: rules append records (sometimes malformed, sometimes
half a line at a time), run one batch, run to idle, crash a worker at a named point of the
batch, let a second worker take the partition over while the first is mid-batch (the first
must be fenced off by the epoch and rejoin), and cut a checkpoint COMMIT through the proxy
(dropped, or committed with the reply lost). After every step:

* the ledger tiles the partition from offset 0 to its committed offset (no gap, no overlap);
* the committed offset never moves back, lies on a line boundary and never past a
  complete line;
* every sink and the dead letters equal a fold of the records below the committed offset,
  computed from the raw file with ``json`` (so nothing above it is visible, nothing below
  it is lost or doubled);
* ``pgstream verify``'s audit is clean.

Crashes are simulated in-process: the crash point raises, the worker's session is closed
without releasing its lease (as when the process dies), and the next worker waits until the
server has ended that session. Real SIGKILLs at every point are in test_crash_points.py.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from netfaults import (
    SINK_DDL,
    PgProxy,
    assert_exact,
    assert_ledger_tiles,
    event_line,
    expected_from,
    make_app,
    verify_clean,
    wait_for,
)

from pgstream.runtime.crashpoints import POINTS
from pgstream.runtime.worker import Worker

JOB = "prop"
RESET = f"""
TRUNCATE facts, totals, folds;
DELETE FROM pgstream.partitions WHERE job = '{JOB}';
DELETE FROM pgstream.dead_letters WHERE job = '{JOB}';
DELETE FROM pgstream.state WHERE job = '{JOB}';
DELETE FROM pgstream.workers WHERE job = '{JOB}';
DELETE FROM pgstream.jobs WHERE job = '{JOB}';
"""


class SimulatedCrash(BaseException):
    """The worker 'dies' here (BaseException: nothing in the runtime may catch it)."""


class _Hooks:
    """One-shot actions at named crash points, installed over the runtime's crash_point."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, Callable[[], None]]] = []

    def at(self, point: str, action: Callable[[], None]) -> None:
        self.actions.append((point, action))

    def __call__(self, name: str) -> None:
        for i, (point, action) in enumerate(self.actions):
            if point == name:
                del self.actions[i]
                action()
                return

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Also adds the point ``before_begin``: the batch is read and evaluated, its
        transaction not yet begun (where a frozen zombie holds a batch it will commit)."""
        from pgstream.runtime.checkpoint import commit_batch as real_commit


        def commit_batch(*args: Any, **kwargs: Any) -> int:
            self("before_begin")
            return real_commit(*args, **kwargs)

        with mock.patch("pgstream.runtime.checkpoint.crash_point", self), mock.patch(
            "pgstream.runtime.task.crash_point", self
        ), mock.patch("pgstream.runtime.committer.commit_batch", commit_batch):
            yield


class CheckpointMachine(RuleBasedStateMachine):
    dsn: str = ""
    workdir: Path = Path(".")
    counter = itertools.count()
    seen: Counter[str] = Counter()  # faults that really happened, over all examples

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.path = self.workdir / f"events-{n}.jsonl"
        self.path.write_bytes(b"")
        self.next_id = 0
        self.partial = b""  # the first part of a line written without its newline
        self.last_committed = 0
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.conn.execute(RESET)
        self.app = make_app(JOB, self.path, batch_size=7, lease_seconds=10)
        self.proxy = PgProxy.for_dsn(self.dsn).start()
        self.hooks = _Hooks()

    def teardown(self) -> None:
        self.proxy.stop()
        self.conn.close()

    # -- running workers ----------------------------------------------------------------------

    def _worker(self, *, one_batch: bool, via_proxy: bool = False) -> Worker:
        dsn = self.proxy.dsn(self.dsn) if via_proxy else self.dsn
        holder: list[Worker] = []

        def stop_after_commit(task: Any, n: int) -> None:
            if one_batch:
                holder[0].stop()

        w = Worker(self.app, dsn, stop_when_idle=True, install_signal_handlers=False,
                   on_commit=stop_after_commit)
        holder.append(w)
        return w

    def _run(self, w: Worker) -> bool:
        """Run ``w``; True if it 'crashed' (its session is then gone, its lease not released)."""
        try:
            with self.hooks.installed():
                w.run()
        except SimulatedCrash:
            return True
        return False

    def _crash_here(self, w: Worker, point: str) -> None:
        pid = w.db.conn.info.backend_pid

        def die() -> None:
            w._shutdown = lambda: w.db.reset()  # type: ignore[method-assign]
            raise SimulatedCrash(point)

        self.hooks.at(point, die)
        self._dead_pid = pid

    def _wait_session_gone(self, pid: int) -> None:
        wait_for(
            lambda: self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone() == (0,),
            10, f"backend {pid} to exit",
        )

    # -- rules ----------------------------------------------------------------------------------

    def _ensure_backlog(self) -> None:
        """Faults are only interesting with a batch to cut: append records if none is left."""
        data = self.path.read_bytes()
        if self._committed() >= data.rfind(b"\n") + 1:
            self.produce(12, malformed=False, split=False)

    @rule(n=st.integers(1, 30), malformed=st.booleans(), split=st.booleans())
    def produce(self, n: int, malformed: bool, split: bool) -> None:
        lines = [event_line(self.next_id + i) for i in range(n)]
        self.next_id += n
        if malformed:
            lines.insert(len(lines) // 2, b'{"id": oops\n')
        data = self.partial + b"".join(lines)
        self.partial = b""
        if split:  # leave the last line incomplete until the next produce
            cut = len(data) - 5
            data, self.partial = data[:cut], data[cut:]
        with open(self.path, "ab") as f:
            f.write(data)

    @rule()
    def run_one_batch(self) -> None:
        assert not self._run(self._worker(one_batch=True))

    @rule()
    def run_to_idle(self) -> None:
        assert not self._run(self._worker(one_batch=False))
        data = self.path.read_bytes()
        assert self._committed() == data.rfind(b"\n") + 1, "idle but not caught up"

    @rule(point=st.sampled_from(POINTS))
    def crash(self, point: str) -> None:
        self._ensure_backlog()
        w = self._worker(one_batch=True)
        w.db.conn  # noqa: B018 - connect now, to know the session to wait for
        self._crash_here(w, point)
        crashed = self._run(w)
        self.hooks.actions.clear()  # nothing to read: the point was never reached
        if crashed:
            self.seen[f"crash:{point}"] += 1
            self._wait_session_gone(self._dead_pid)

    @rule(point=st.sampled_from(["after_read", "before_begin"]))
    def takeover_mid_batch(self, point: str) -> None:
        """Worker A reads a batch; its lease lapses (as if A were frozen); worker B claims
        the partition (new epoch), commits a batch and leaves; A resumes: its commit must
        be fenced off (by the attempts bump after ``after_read``, by the compare-and-set of
        its batch transaction after ``before_begin``), and it rejoins under a newer epoch."""
        a = self._worker(one_batch=True)
        epochs: list[int] = []

        def b_takes_over() -> None:
            epochs.append(self._epoch())
            # a frozen A misses its lease renewal and its heartbeat alike: with only the lease
            # expired, A would still count as a live worker holding the one partition's share,
            # and B would wait a whole lease (10 s) for A's heartbeat to go stale
            self.conn.execute(
                "UPDATE pgstream.partitions SET lease_expires_at = now() - interval '1 second' "
                "WHERE job = %s",
                [JOB],
            )
            self.conn.execute(
                "UPDATE pgstream.workers SET heartbeat_at = now() - interval '1 minute' "
                "WHERE job = %s",
                [JOB],
            )
            assert not self._run(self._worker(one_batch=True))
            epochs.append(self._epoch())

        self.hooks.at(point, b_takes_over)
        assert not self._run(a)
        self.hooks.actions.clear()
        if epochs:
            assert epochs[1] == epochs[0] + 1, "B claimed with a new epoch"
            assert self._epoch() == epochs[1] + 1, "A was fenced off and re-claimed"
            self.seen[f"zombie fenced at {point}"] += 1

    @rule(fault=st.sampled_from(["drop_commit", "cut_reply"]))
    def cut_commit(self, fault: Any) -> None:
        self._ensure_backlog()
        before = len(self.proxy.stats.events)
        self.proxy.arm(fault)
        assert not self._run(self._worker(one_batch=True, via_proxy=True))
        fired = len(self.proxy.stats.events) - before
        self.proxy.disarm()
        assert fired in (0, 1)
        if fired:
            self.seen[fault] += 1

    # -- invariants -------------------------------------------------------------------------------

    def _committed(self) -> int:
        row = self.conn.execute(
            "SELECT committed_offset FROM pgstream.partitions WHERE job = %s", [JOB]
        ).fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def _epoch(self) -> int:
        row = self.conn.execute(
            "SELECT epoch FROM pgstream.partitions WHERE job = %s", [JOB]
        ).fetchone()
        return 0 if row is None else int(row[0])

    @invariant()
    def checkpoint_is_consistent(self) -> None:
        data = self.path.read_bytes()
        assert_ledger_tiles(self.conn, JOB, {("events", "0"): 0})
        top = self._committed()
        assert top >= self.last_committed, f"committed offset moved back: {top}"
        assert top <= data.rfind(b"\n") + 1, "committed past the last complete line"
        assert top == 0 or data[top - 1 : top] == b"\n", "committed offset not at a line start"
        self.last_committed = top
        assert_exact(self.conn, JOB, expected_from(data, upto=top))

    @precondition(lambda self: self.last_committed > 0)
    @invariant()
    def verify_is_clean(self) -> None:
        verify_clean(self.app, self.dsn)


@pytest.mark.slow
def test_checkpoint_protocol_state_machine(pg_dsn: str, pg_conn: psycopg.Connection[Any],
                                           tmp_path: Path) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    pg_conn.execute(SINK_DDL)
    CheckpointMachine.dsn = pg_dsn
    CheckpointMachine.workdir = tmp_path
    CheckpointMachine.seen.clear()
    log = logging.getLogger("pgstream")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        run_state_machine_as_test(
            CheckpointMachine,
            settings=settings(
                max_examples=25,
                stateful_step_count=10,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                database=None,
                derandomize=True,
            ),
        )
    finally:
        log.setLevel(level)
    seen = CheckpointMachine.seen
    print(dict(seen))
    # the run really exercised every kind of fault
    for kind in ("drop_commit", "cut_reply", "zombie fenced at before_begin"):
        assert seen[kind] >= 1, f"{kind} never happened: {dict(seen)}"
    assert sum(n for k, n in seen.items() if k.startswith("crash:")) >= 3, dict(seen)

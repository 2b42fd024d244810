"""Network faults between a worker and PostgreSQL, and small helpers for the fault tests.

:class:`PgProxy` is a threaded TCP proxy on loopback that understands just enough of the
PostgreSQL wire protocol (v3) to find the COMMIT of a checkpoint transaction and fail it
deterministically:

* ``drop_commit``: the client's COMMIT never reaches the server; the proxy then cuts both
  sides. The server rolls the transaction back when it sees the connection go; the client
  sees a connection lost *during COMMIT* (unknown outcome; the truth: not committed).
* ``cut_reply``: the COMMIT is forwarded, the proxy waits for the server's reply
  (CommandComplete + ReadyForQuery), swallows it and cuts both sides. The client again sees
  a connection lost during COMMIT (unknown outcome; the truth: committed).

COMMIT is recognised both as a simple query (``'Q'`` whose text is ``COMMIT``, what psycopg
sends for a parameterless ``execute``) and as an extended-protocol sequence (``'P'`` whose
text is ``COMMIT`` followed by ``B``/``D``/``E`` up to ``S``, what psycopg sends in pipeline
mode). A transaction counts as a *checkpoint* once a statement containing ``marker`` (by
default the ledger insert ``INSERT INTO pgstream.batches``) went through it, so other
transactions of the same session (the attempts counter, lease updates) are left alone.

SSL and GSS encryption requests are answered ``N`` by the proxy itself, so the stream stays
readable whatever ``sslmode`` the client uses.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

Fault = Literal["drop_commit", "cut_reply"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_LEDGER_MARKER = b"INSERT INTO pgstream.batches"
_EXTENDED = frozenset(b"PBDECHS"[i : i + 1] for i in range(7))  # Parse .. Sync


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault the proxy injected."""

    kind: Fault
    conn_id: int
    at: float
    reply_tag: str | None = None  # cut_reply: the CommandComplete tag swallowed ("COMMIT")


@dataclass(slots=True)
class ProxyStats:
    """What went through the proxy (checkpoint transactions are those with the marker)."""

    connections: int = 0
    checkpoint_txns: int = 0  # transactions in which the marker statement was sent
    checkpoint_commits_forwarded: int = 0  # COMMITs of those that reached the server
    commits_seen: int = 0  # every COMMIT the client sent
    events: list[FaultEvent] = field(default_factory=list)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def _read_typed(sock: socket.socket) -> bytes:
    """One typed protocol message: type byte, int32 length (counting itself), body."""
    head = _recv_exact(sock, 5)
    (length,) = struct.unpack("!i", head[1:])
    if length < 4:
        raise ConnectionError(f"bad message length {length}")
    return head + _recv_exact(sock, length - 4)


def _query_text(msg: bytes) -> bytes | None:
    """The SQL text of a 'Q' (simple query) or 'P' (parse) message, else None."""
    kind, body = msg[:1], msg[5:]
    if kind == b"Q":
        return body.rstrip(b"\x00")
    if kind == b"P":
        name_end = body.find(b"\x00")
        rest = body[name_end + 1 :]
        return rest[: rest.find(b"\x00")]
    return None


def _is_commit(sql: bytes) -> bool:
    return sql.strip().rstrip(b";").strip().upper() in (b"COMMIT", b"END", b"COMMIT WORK")


def _is_rollback(sql: bytes) -> bool:
    return sql.strip().rstrip(b";").strip().upper() in (b"ROLLBACK", b"ABORT")


@dataclass
class _Group:
    """Extended-protocol messages up to Sync or Flush, and whether they execute COMMIT."""

    messages: list[bytes] = field(default_factory=list)
    commits: bool = False


class _Conn:
    """One proxied client connection: two pump threads and the protocol state."""

    def __init__(self, proxy: PgProxy, conn_id: int, client: socket.socket) -> None:
        self.proxy = proxy
        self.id = conn_id
        self.client = client
        self.server: socket.socket | None = None
        self.in_checkpoint = False
        self.statements: dict[bytes, bytes] = {}  # parsed statement name -> SQL text
        self.swallow: FaultEvent | None = None  # cut_reply armed: drop replies until 'Z'
        self.reply_tag: str | None = None
        self.closed = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._client_pump, name=f"pgproxy-c{self.id}", daemon=True).start()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.server):
            if s is None:
                continue
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self.proxy._forget(self)

    # -- client -> server ---------------------------------------------------------------------

    def _startup(self) -> bool:
        """Handle the untyped startup phase; False for a cancel request (forwarded, done)."""
        while True:
            head = _recv_exact(self.client, 8)
            length, code = struct.unpack("!ii", head)
            body = _recv_exact(self.client, length - 8)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                self.client.sendall(b"N")  # no encryption: keep the stream readable
                continue
            self.server = socket.create_connection(self.proxy.upstream, timeout=10)
            self.server.settimeout(None)
            self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.server.sendall(head + body)
            if code == _CANCEL_REQUEST:
                return False
            threading.Thread(
                target=self._server_pump, name=f"pgproxy-s{self.id}", daemon=True
            ).start()
            return True

    def _client_pump(self) -> None:
        try:
            if not self._startup():
                time.sleep(0.2)
                return
            # Extended-protocol messages are collected up to Sync (or Flush) and sent as one
            # group, so a group that executes COMMIT can be dropped or forwarded whole.
            group = _Group()
            while not self.closed.is_set():
                msg = _read_typed(self.client)
                if msg[:1] in _EXTENDED:
                    relayed = self._relay_extended(msg, group)
                else:
                    relayed = self._relay_simple(msg)
                if not relayed:
                    return
        except (OSError, ConnectionError):
            pass
        finally:
            self.close()

    def _relay_extended(self, msg: bytes, group: _Group) -> bool:
        """Add an extended-protocol message to ``group``; at Sync or Flush send the group (a
        COMMIT in it goes through :meth:`_send_commit`). False when the connection is cut."""
        assert self.server is not None
        kind = msg[:1]
        if kind == b"P":
            name = msg[5 : msg.index(b"\x00", 5)]
            self.statements[name] = _query_text(msg) or b""
        elif kind == b"B":
            portal_end = msg.index(b"\x00", 5)
            stmt = msg[portal_end + 1 : msg.index(b"\x00", portal_end + 1)]
            sql = self.statements.get(stmt, b"")
            if _is_commit(sql):
                group.commits = True
            else:
                self._note_statement(sql)
        group.messages.append(msg)
        if kind not in (b"S", b"H"):
            return True
        data, commits = b"".join(group.messages), group.commits
        group.messages, group.commits = [], False
        if not commits:
            self.server.sendall(data)
            return True
        self.proxy.stats.commits_seen += 1
        return self._send_commit(data, self.proxy._take(self.in_checkpoint))

    def _relay_simple(self, msg: bytes) -> bool:
        """Forward a simple-protocol (or any other) message; a COMMIT goes through
        :meth:`_send_commit`. False when the connection is cut or the client said goodbye."""
        assert self.server is not None
        kind = msg[:1]
        sql = _query_text(msg) if kind == b"Q" else None
        if sql is not None and _is_commit(sql):
            self.proxy.stats.commits_seen += 1
            return self._send_commit(msg, self.proxy._take(self.in_checkpoint))
        if sql is not None:
            self._note_statement(sql)
        self.server.sendall(msg)
        return kind != b"X"

    def _note_statement(self, sql: bytes) -> None:
        """Track whether the open transaction is a checkpoint (the marker went through)."""
        if _is_rollback(sql):
            self.in_checkpoint = False
        elif self.proxy.marker in sql:
            self._mark_checkpoint()

    def _mark_checkpoint(self) -> None:
        if not self.in_checkpoint:
            self.in_checkpoint = True
            self.proxy.stats.checkpoint_txns += 1

    def _send_commit(self, data: bytes, fault: Fault | None) -> bool:
        """Forward (or drop) a COMMIT; False when the connection is to be cut now."""
        assert self.server is not None
        was_checkpoint, self.in_checkpoint = self.in_checkpoint, False
        if fault == "drop_commit":
            self.proxy._record(FaultEvent("drop_commit", self.id, time.monotonic()))
            return False
        if was_checkpoint:
            self.proxy.stats.checkpoint_commits_forwarded += 1
        if fault == "cut_reply":
            self.swallow = FaultEvent("cut_reply", self.id, time.monotonic())
        self.server.sendall(data)
        return True

    # -- server -> client ---------------------------------------------------------------------

    def _server_pump(self) -> None:
        assert self.server is not None
        try:
            while not self.closed.is_set():
                msg = _read_typed(self.server)
                if self.swallow is not None:
                    kind = msg[:1]
                    if kind == b"C":
                        self.reply_tag = msg[5:].rstrip(b"\x00").decode(errors="replace")
                    if kind == b"Z":
                        ev = self.swallow
                        self.proxy._record(
                            FaultEvent(ev.kind, ev.conn_id, ev.at, reply_tag=self.reply_tag)
                        )
                        return
                    continue
                self.client.sendall(msg)
        except (OSError, ConnectionError):
            pass
        finally:
            self.close()


class PgProxy:
    """A loopback TCP proxy to a PostgreSQL server that can fail checkpoint COMMITs.

    Use as a context manager; :meth:`dsn` rewrites a DSN to go through the proxy.
    :meth:`arm` schedules faults on upcoming checkpoint COMMITs; :meth:`cut_all` cuts every
    live connection at once.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, marker: bytes = _LEDGER_MARKER
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.marker = marker
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._plan: list[tuple[Fault, int, bool]] = []  # (fault, skip, any_commit)
        self._conns: set[_Conn] = set()
        self._ids = 0
        self._fired = threading.Condition(self._lock)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.5)
        self.port: int = self._sock.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="pgproxy", daemon=True)

    @classmethod
    def for_dsn(cls, dsn: str, **kwargs: Any) -> PgProxy:
        """A proxy in front of the server ``dsn`` points at (TCP only)."""
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "127.0.0.1")
        if host.startswith("/") or host == "localhost":
            host = "127.0.0.1"
        return cls(host, int(params.get("port") or 5432), **kwargs)

    def dsn(self, dsn: str) -> str:
        """``dsn`` pointed at this proxy (``sslmode=disable``: the proxy reads the stream)."""
        if dsn.startswith(("postgresql://", "postgres://")):
            parts = urlsplit(dsn)
            user = parts.username or ""
            pw = f":{parts.password}" if parts.password else ""
            auth = f"{user}{pw}@" if user else ""
            query = "&".join(q for q in parts.query.split("&") if q and not q.startswith(
                ("host=", "port=", "sslmode=")))
            query = (query + "&" if query else "") + "sslmode=disable"
            return f"postgresql://{auth}127.0.0.1:{self.port}{parts.path}?{query}"
        return make_conninfo(dsn, host="127.0.0.1", port=str(self.port), sslmode="disable")

    # -- control --------------------------------------------------------------------------------

    def arm(self, fault: Fault, *, skip: int = 0, times: int = 1, any_commit: bool = False) -> None:
        """Inject ``fault`` into the checkpoint COMMITs after the next ``skip`` ones, ``times``
        times (``any_commit``: into any COMMIT, checkpoint or not)."""
        with self._lock:
            for i in range(times):
                self._plan.append((fault, skip if i == 0 else 0, any_commit))

    def disarm(self) -> None:
        with self._lock:
            self._plan.clear()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._plan)

    def wait_fired(self, n: int, timeout: float = 30.0) -> list[FaultEvent]:
        """Block until ``n`` faults have been injected (completed); return the events."""
        with self._fired:
            ok = self._fired.wait_for(lambda: len(self.stats.events) >= n, timeout)
            if not ok:
                raise AssertionError(f"only {len(self.stats.events)} of {n} faults fired")
            return list(self.stats.events)

    def cut_all(self) -> int:
        """Cut every live connection (both sides) right now; return how many."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        return len(conns)

    def start(self) -> PgProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with contextlib.suppress(OSError):
            self._sock.close()
        self.cut_all()
        self._thread.join(timeout=5)

    def __enter__(self) -> PgProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._ids += 1
                conn = _Conn(self, self._ids, client)
                self._conns.add(conn)
                self.stats.connections += 1
            conn.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _take(self, checkpoint: bool) -> Fault | None:
        """The fault for this COMMIT, if one is armed for it."""
        with self._lock:
            if not self._plan:
                return None
            fault, skip, any_commit = self._plan[0]
            if not (checkpoint or any_commit):
                return None
            if skip > 0:
                self._plan[0] = (fault, skip - 1, any_commit)
                return None
            self._plan.pop(0)
            return fault

    def _record(self, event: FaultEvent) -> None:
        with self._fired:
            self.stats.events.append(event)
            self._fired.notify_all()


# -- helpers shared by the fault tests ----------------------------------------------------------


def ledger(conn: psycopg.Connection[Any], job: str) -> list[tuple[str, str, int, int, int]]:
    """(source, partition, start, end, epoch) of every committed batch, in offset order."""
    rows = conn.execute(
        "SELECT source, partition, start_offset, end_offset, epoch FROM pgstream.batches "
        "WHERE job = %s ORDER BY source, partition, start_offset",
        [job],
    ).fetchall()
    return [(r[0], r[1], int(r[2]), int(r[3]), int(r[4])) for r in rows]


def assert_ledger_tiles(
    conn: psycopg.Connection[Any], job: str, initial: dict[tuple[str, str], int] | None = None
) -> dict[tuple[str, str], int | None]:
    """Every partition's ledger is a gap-free, overlap-free chain from its initial offset to
    its committed offset. Returns the committed offset of each partition."""
    initial = initial or {}
    committed = {
        (r[0], r[1]): (None if r[2] is None else int(r[2]))
        for r in conn.execute(
            "SELECT source, partition, committed_offset FROM pgstream.partitions WHERE job = %s",
            [job],
        ).fetchall()
    }
    chains: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for src, part, start, end, _ in ledger(conn, job):
        chains.setdefault((src, part), []).append((start, end))
    for key, top in committed.items():
        chain = chains.pop(key, [])
        if top is None:
            assert not chain, f"{key}: ledger rows but nothing committed: {chain[:3]}"
            continue
        assert chain, f"{key}: committed {top} without a ledger"
        if key in initial:
            assert chain[0][0] == initial[key], f"{key}: ledger starts at {chain[0][0]}"
        for (s1, e1), (s2, e2) in itertools.pairwise(chain):
            assert e1 == s2, f"{key}: ledger gap/overlap between [{s1},{e1}) and [{s2},{e2})"
        for s, e in chain:
            assert e > s, f"{key}: empty batch [{s},{e})"
        assert chain[-1][1] == top, f"{key}: ledger ends at {chain[-1][1]}, committed {top}"
    assert not chains, f"ledger rows for unregistered partitions: {list(chains)}"
    return committed


def terminate_sessions(conn: psycopg.Connection[Any], pattern: str = "pgstream:%") -> int:
    """``pg_terminate_backend`` every session of this database whose application_name
    matches ``pattern``; returns how many were terminated."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE %s "
        "AND pid <> pg_backend_pid()",
        [pattern],
    ).fetchall()
    return sum(1 for r in rows if r[0])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until truthy; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def background(fn: Callable[[threading.Event], None]) -> Iterator[threading.Event]:
    """Run ``fn(stop_event)`` in a daemon thread for the duration of the block."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(stop)
        except BaseException as exc:  # re-raised at exit
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(timeout=30)
    if errors:
        raise errors[0]


# -- an in-process workload: a JSON Lines file through three kinds of sink ---------------------

SINK_DDL = """
CREATE TABLE facts (
    id bigint NOT NULL, user_id bigint NOT NULL, cents bigint NOT NULL,
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq integer NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX facts_pos ON facts (_source, _partition, _offset, _seq);
CREATE TABLE totals (user_id bigint PRIMARY KEY, n bigint NOT NULL, total numeric);
CREATE TABLE folds (user_id bigint PRIMARY KEY, n bigint, h bigint, last bigint);
"""

HASH_MOD = 1_000_000_007


def fold_step(state: dict[str, int], r: dict[str, Any]) -> dict[str, int]:
    """Order-sensitive per-user state: a replayed or skipped record changes ``h``."""
    return {"n": state["n"] + 1, "h": (state["h"] * 31 + r["id"]) % HASH_MOD, "last": r["id"]}


def make_app(
    name: str, path: Any, *, batch_size: int = 500, lease_seconds: float = 10.0, **kw: Any
) -> Any:
    """``facts`` (append), ``totals`` (aggregate) and ``folds`` (fold) from a file of events
    ``{"id", "user", "amount"}``."""
    import pgstream as ps

    app = ps.App(
        name, batch_size=batch_size, max_interval=0.05, poll_interval=0.02,
        lease_seconds=lease_seconds, **kw,
    )
    s = app.stream("events", ps.FileSource(path))
    s.map(lambda r: {"id": r["id"], "user_id": r["user"], "cents": r["amount"] * 100}).to_table(
        "facts"
    )
    keyed = s.key_by("user", name="user_id")
    keyed.aggregate(n=ps.count(), total=ps.sum("amount")).to_table("totals")
    keyed.fold({"n": 0, "h": 0, "last": 0}, fold_step).to_table("folds")
    return app


def event_line(i: int, users: int = 50) -> bytes:
    return b'{"id": %d, "user": %d, "amount": %d}\n' % (i, (i * 7919) % users, (i * 31) % 101 - 20)


def write_events(path: Any, start: int, n: int, users: int = 50) -> None:
    """Append events ``start .. start+n-1`` to ``path``."""
    with open(path, "ab") as f:
        f.write(b"".join(event_line(i, users) for i in range(start, start + n)))


@dataclass
class Expected:
    facts: list[tuple[Any, ...]]
    totals: dict[int, tuple[int, int]]
    folds: dict[int, tuple[int, int, int]]
    dead: list[int]


def file_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of every complete, non-blank line."""
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return
        if data[pos:nl].strip():
            yield pos, data[pos:nl]
        pos = nl + 1


def expected_from(data: bytes, upto: int | None = None, source: str = "events") -> Expected:
    """The sinks' content after the records below byte offset ``upto`` (None: all), computed
    from the raw file with ``json`` (not pgstream's operators); undecodable lines and
    non-objects are dead letters."""
    import json

    exp = Expected([], {}, {}, [])
    for off, line in file_lines(data):
        if upto is not None and off >= upto:
            break
        try:
            r = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            exp.dead.append(off)
            continue
        if not isinstance(r, dict):
            exp.dead.append(off)
            continue
        exp.facts.append((r["id"], r["user"], r["amount"] * 100, source, "0", off, 0))
        n, total = exp.totals.get(r["user"], (0, 0))
        exp.totals[r["user"]] = (n + 1, total + r["amount"])
        fn, h, _ = exp.folds.get(r["user"], (0, 0, 0))
        exp.folds[r["user"]] = (fn + 1, (h * 31 + r["id"]) % HASH_MOD, r["id"])
    return exp


def actual(conn: psycopg.Connection[Any], job: str) -> Expected:
    facts = [
        tuple(r)
        for r in conn.execute(
            "SELECT id, user_id, cents, _source, _partition, _offset, _seq FROM facts"
        ).fetchall()
    ]
    totals = {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in conn.execute("SELECT user_id, n, total FROM totals").fetchall()
    }
    folds = {
        int(r[0]): (int(r[1]), int(r[2]), int(r[3]))
        for r in conn.execute("SELECT user_id, n, h, last FROM folds").fetchall()
    }
    dead = [
        int(r[0])
        for r in conn.execute(
            'SELECT "offset" FROM pgstream.dead_letters WHERE job = %s ORDER BY 1', [job]
        ).fetchall()
    ]
    return Expected(facts, totals, folds, dead)


def assert_exact(conn: psycopg.Connection[Any], job: str, want: Expected) -> None:
    """Sinks and dead letters equal ``want``: nothing lost, duplicated or unexpected."""
    from collections import Counter

    got = actual(conn, job)
    cw, cg = Counter(want.facts), Counter(got.facts)
    lost, extra = cw - cg, cg - cw
    assert not lost and not extra, (
        f"facts: {sum(lost.values())} lost (e.g. {list(lost)[:3]}), "
        f"{sum(extra.values())} duplicated/unexpected (e.g. {list(extra)[:3]})"
    )
    assert got.totals == want.totals, _dict_diff("totals", want.totals, got.totals)
    assert got.folds == want.folds, _dict_diff("folds", want.folds, got.folds)
    assert sorted(got.dead) == sorted(want.dead), f"dead letters {got.dead} != {want.dead}"


def _dict_diff(name: str, want: dict[Any, Any], got: dict[Any, Any]) -> str:
    keys = sorted(set(want) | set(got))
    diff = [(k, want.get(k), got.get(k)) for k in keys if want.get(k) != got.get(k)]
    return f"{name}: {len(diff)} keys differ, e.g. {diff[:3]}"


def verify_clean(app: Any, dsn: str) -> None:
    """``pgstream verify``'s audit (in-process) finds no violation."""
    from pgstream.verify import verify_app

    report = verify_app(app, dsn)
    assert report.ok, "\n".join(
        [report.summary(), *(v.describe() for v in report.violations[:20])]
    )


# -- a throwaway PostgreSQL cluster ---------------------------------------------------------------

PG_BIN = "/usr/lib/postgresql/15/bin"


def find_bindir() -> str:
    """PostgreSQL server binaries: the system's (15 first, then any), else the ones the
    ``pgserver`` package bundles."""
    import glob
    import importlib.util
    import os

    def usable(d: str) -> bool:
        return all(os.path.exists(os.path.join(d, tool)) for tool in ("initdb", "pg_ctl"))

    for d in [PG_BIN, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if usable(d):
            return d
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        d = os.path.join(os.path.dirname(spec.origin), "pginstall", "bin")
        if usable(d):
            return d
    raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl) found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A PostgreSQL cluster of its own in a temporary directory, for tests that restart or
    crash the server (never the shared one). As root, the server runs as ``user`` (initdb
    refuses root). ``dsn`` connects as the cluster's superuser over TCP (trust)."""

    def __init__(
        self, *, user: str = "pgserver", bindir: str | None = None, max_connections: int = 40
    ) -> None:
        import os
        import shutil
        import tempfile

        bindir = bindir or find_bindir()
        self.bindir = bindir
        if not os.path.exists(f"{bindir}/initdb"):
            raise FileNotFoundError(f"no PostgreSQL binaries in {bindir}")
        self.as_root = os.geteuid() == 0
        self.user = user if self.as_root else ""
        if self.as_root:
            import pwd

            try:
                pwd.getpwnam(user)
            except KeyError:
                user = "postgres"
                pwd.getpwnam(user)  # KeyError when neither user exists
            self.user = user
        self.dir = tempfile.mkdtemp(prefix="pgstream-cluster-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.data = f"{self.dir}/data"
        self.log = f"{self.dir}/server.log"
        self.port = free_port()
        self.max_connections = max_connections
        if self.as_root:
            shutil.chown(self.dir, user=user)
        self.superuser = user if self.as_root else "postgres"
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", self.superuser, "-E", "UTF8",
                  "--no-instructions")

    def _run(self, tool: str, *args: str, check: bool = True) -> Any:
        import subprocess

        cmd = [f"{self.bindir}/{tool}", *args]
        if self.as_root:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if check and res.returncode != 0:
            raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr or res.stdout}")
        return res

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                f"-c max_connections={self.max_connections} -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", opts,
                  "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart_immediate(self, down: float = 0.5) -> None:
        """Crash-stop (``-m immediate``: no shutdown checkpoint, recovery on start), wait
        ``down`` seconds, start again."""
        self.stop("immediate")
        time.sleep(down)
        self.start()

    def destroy(self) -> None:
        import shutil

        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

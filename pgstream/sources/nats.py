"""A NATS JetStream stream as a source (nats-py, extra ``nats``).

The offset of a message is its stream sequence; a stream is one partition, ``"0"`` (JetStream
orders a stream as a whole; to spread a job over workers, use several streams). A batch
``[start, end)`` holds the messages with sequences ``start .. end - 1``, read with an
ephemeral pull consumer (no acks, nothing stored in NATS: PostgreSQL holds the offsets) that
starts at the committed sequence. nats-py is asynchronous: each reader runs its client on a
private event-loop thread, so the runtime sees an ordinary blocking reader.

Sequences of a stream have no holes except where messages were deleted or expired, so a
read fails loudly (:class:`SourceError` naming the stream and the sequences) when the stream's
first sequence is above the committed one (expired by ``max_age``/``max_msgs``, purged), when
its last sequence is below it (the stream was recreated), and when messages inside the range
being read are missing (deleted): they can never be read, and passing over them silently
would hide the loss. A job with nothing committed starts at the stream's first retained
message.

``on_lost="earliest"`` continues at the first message still held after lost ones (expired
before the committed sequence, or deleted inside a range); ``on_lost="latest"`` skips to the
stream's end. Either records the skipped range (:class:`~pgstream.sources.base.Skip`). A
recreated stream always stops the job. A server that cannot be reached raises
:class:`~pgstream.sources.base.SourceUnreachable` (retried by the runtime with a new
connection).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson
import psycopg

from pgstream.errors import ConfigError
from pgstream.sources.base import (
    OnLost,
    OpenContext,
    PartitionReader,
    ReadResult,
    Skip,
    SkipLog,
    Source,
    SourceError,
    SourceUnreachable,
    check_on_lost,
)
from pgstream.sources.raw import JsonPayloads

__all__ = ["NatsReader", "NatsSource"]

T = TypeVar("T")

_FETCH_TIMEOUT = 2.0  # seconds a fetch waits for messages the stream said it holds


def _nats() -> Any:
    try:
        import nats
    except ImportError:
        raise ConfigError(
            "NatsSource needs the nats-py package; fix: pip install 'pgstream-engine[nats]'"
        ) from None
    return nats


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: errors reach the reader as exceptions, not log noise."""


class NatsSource(Source):
    """Messages of the JetStream stream ``stream``; each message's data is one JSON object.

    One partition, ``"0"``; the offset is the stream sequence. Messages that are not one JSON
    object go to the dead letters. ``connect_timeout`` bounds every request to the server;
    ``on_lost`` is what to do when unread messages expired or were deleted.
    """

    kind = "nats"

    def __init__(
        self,
        stream: str,
        *,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        connect_timeout: float = 5.0,
        on_lost: OnLost = "error",
    ) -> None:
        if not stream or any(c in stream for c in " .*>\t\r\n"):
            raise ConfigError(f"NatsSource: {stream!r} is not a JetStream stream name")
        self.stream = stream
        self.servers: list[str] = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise ConfigError("NatsSource: servers= names no server")
        self.connect_timeout = connect_timeout
        self.on_lost = check_on_lost(f"NatsSource({stream!r})", on_lost)

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """A stream is one partition, ``"0"``."""
        return ["0"]

    def initial_offset(self, partition: str) -> int:
        """0: nothing committed, start at the stream's first retained message."""
        return 0

    def open(self, partition: str, context: OpenContext) -> NatsReader:
        """Connect and return a reader of the stream (``context`` is unused)."""
        if partition != "0":
            raise SourceError(f"{self.describe()} has only partition '0', not {partition!r}")
        return NatsReader(self)

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Raise :class:`SourceError` if the server is unreachable or the stream missing."""
        NatsReader(self).close()

    def offset_at(self, partition: str, when: datetime, context: OpenContext) -> int | None:
        """The sequence of the stream's first message stored at or after ``when`` (the
        stream's last sequence + 1 when none is), as JetStream itself positions a consumer
        that starts at a time."""
        reader = self.open(partition, context)
        try:
            return reader.sequence_at(when)
        finally:
            reader.close()

    def identity(self) -> str:
        """``nats <servers> stream <name>``."""
        return f"nats {','.join(self.servers)} stream {self.stream}"

    def describe(self) -> str:
        """``nats stream <name>``."""
        return f"nats stream {self.stream}"

    def __repr__(self) -> str:
        return f"NatsSource({self.stream!r}, servers={','.join(self.servers)!r})"


def _stream_seq(msg: Any) -> int:
    """A JetStream message's stream sequence, from its reply subject (fast path for the
    common ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`` form)."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)


class _Pull:
    """An ephemeral pull consumer; its messages arrive on ``inbox`` through :meth:`deliver`,
    which collects one pull request's messages until ``want`` arrived or a status ends it."""

    def __init__(self, subject: str, name: str) -> None:
        self.subject = subject  # where pull requests go
        self.name = name
        self.inbox = ""
        self.sub: Any = None
        self.stale = False
        self.start(0)

    def start(self, want: int) -> None:
        self.want = want
        self.values: list[bytes] = []
        self.seqs: list[int] = []
        self.status: str | None = None
        self.done = asyncio.Event()

    async def deliver(self, msg: Any) -> None:
        headers = msg.headers
        if headers and "Status" in headers:  # 404/408: the request ended; 409: refused
            self.status = headers["Status"]
            self.done.set()
            return
        self.values.append(msg.data)
        self.seqs.append(_stream_seq(msg))
        if len(self.values) >= self.want:
            self.done.set()


class _LoopThread:
    """An asyncio event loop on its own daemon thread; :meth:`run` waits for a coroutine."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_rest(), 5.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class NatsReader(PartitionReader):
    """Reads one JetStream stream by sequence ranges (see the module docstring)."""

    def __init__(self, source: NatsSource) -> None:
        self.source = source
        self.where = f"NATS stream {source.stream!r} on {','.join(source.servers)}"
        self._timeout = source.connect_timeout + _FETCH_TIMEOUT + 5.0
        self._loop = _LoopThread(f"pgstream-nats-{source.stream}")
        self._nc: Any = None
        self._js: Any = None
        self._pull: _Pull | None = None
        self._next = -1  # the sequence the open consumer delivers next
        self._lock: asyncio.Lock | None = None
        self._log = SkipLog()
        self._created: str | None = None  # the stream's creation time (its instance)
        try:
            self._loop.run(self._connect(), self._timeout)
        except BaseException:
            self.close()
            raise

    # -- the event-loop side ---------------------------------------------------------------

    async def _connect(self) -> None:
        nats = _nats()
        try:
            self._nc = await nats.connect(
                self.source.servers,
                connect_timeout=self.source.connect_timeout,
                max_reconnect_attempts=3,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                error_cb=_quiet,
            )
        except Exception as exc:
            raise SourceUnreachable(
                f"cannot reach the NATS server {','.join(self.source.servers)} "
                f"for stream {self.source.stream!r}: {type(exc).__name__}: {exc}; "
                "fix: start the server or correct servers="
            ) from None
        self._js = self._nc.jetstream(timeout=self.source.connect_timeout)
        self._lock = asyncio.Lock()
        await self._state()

    async def _state(self) -> tuple[int, int]:
        """The stream's (first, last) sequence; SourceError if the stream does not exist."""
        from nats.js.errors import NotFoundError

        try:
            info = await self._js.stream_info(self.source.stream)
        except NotFoundError:
            raise SourceError(
                f"{self.where} does not exist; fix: create it (nats stream add "
                f"{self.source.stream}) or correct the name given to NatsSource"
            ) from None
        self._created = str(info.created) if info.created is not None else None
        return int(info.state.first_seq), int(info.state.last_seq)

    async def _read(self, start: int, max_records: int) -> JsonPayloads:
        assert self._lock is not None
        async with self._lock:  # one pull at a time (the read-ahead thread reads too)
            return await self._read_locked(start, max_records)

    async def _read_locked(self, start: int, max_records: int) -> JsonPayloads:
        first, last = await self._state()
        head = last + 1
        if start > head:
            raise SourceError(
                f"{self.where}: the committed sequence {start} is beyond the stream's last "
                f"sequence {last} (the stream was recreated or purged); fix: reset the job's "
                "offsets if the new stream is meant (pgstream job reset MODULE:APP --stream S "
                "--yes; on_lost does not apply)"
            )
        begin = max(start, first, 1)
        if start > 0 and start < first:
            detail = f"the stream's first sequence is now {first}"
            if self.source.on_lost == "error":
                raise SourceError(
                    f"{self.where}: messages from the committed sequence {start} are gone, "
                    f"{detail} (expired by the stream's limits, deleted or purged); fix: keep "
                    "messages longer, reset the job's offsets, or opt into "
                    "NatsSource(..., on_lost='earliest' or 'latest')"
                )
            if self._skip(start, first, head, "retention", detail):
                return JsonPayloads([], [], start, head, head)
        if last == 0 or begin > last:  # nothing to read (after a skip: commit the skip)
            end = max([start] + [k.end for k in self._log.within(start, start + 1)])
            return JsonPayloads([], [], start, end, head)
        values, seqs = await self._fetch(begin, min(max_records, last - begin + 1), start == 0)
        if self.source.on_lost != "error":
            values, seqs, skipped_to = self._over_gaps(begin, values, seqs, start == 0, head)
            if skipped_to is not None:
                await self._drop_consumer()
                return JsonPayloads(values, seqs, start, skipped_to, head)
        end = seqs[-1] + 1 if seqs else start
        return JsonPayloads(values, seqs, start, end, max(head, end))

    def _skip(self, start: int, to: int, head: int, reason: str, detail: str) -> bool:
        """Record the skip of ``[start, to)`` (to ``head`` under ``"latest"``); True when
        reading goes on at the end (``"latest"``)."""
        latest = self.source.on_lost == "latest"
        end = max(to, head) if latest else to
        self._log.add(Skip(start, end, reason, detail, self.source.on_lost))
        return latest

    def _over_gaps(
        self, begin: int, values: list[bytes], seqs: list[int], from_first: bool, head: int
    ) -> tuple[list[bytes], list[int], int | None]:
        """Under a reset policy: record each hole in ``seqs`` as a skip; under ``"latest"``
        cut the read at the first hole and say where reading goes on (the end)."""
        expected = seqs[0] if from_first and seqs else begin
        for i, seq in enumerate(seqs):
            if seq != expected:
                detail = f"sequences {expected}..{seq - 1} were deleted or expired"
                if self._skip(expected, seq, head, "deleted", detail):
                    return values[:i], seqs[:i], head
            expected = seq + 1
        return values, seqs, None

    def retained_from(self) -> int | None:
        """The stream's first retained sequence."""
        try:
            return self._loop.run(self._state(), self._timeout)[0]
        except SourceError:
            raise
        except Exception as exc:
            raise self._failed("reading the stream's state", exc) from exc

    def instance(self) -> str | None:
        """``stream created <time>``: a recreated stream has another creation time."""
        if self._created is None:
            self.head()  # reads the stream's info
        return None if self._created is None else f"stream created {self._created}"

    def skips(self, start: int, end: int) -> list[Skip]:
        """The ranges the ``on_lost`` policy skipped from ``[start, end)``."""
        return self._log.within(start, end)

    def forget_skips(self, below: int) -> None:
        """Their batch committed."""
        self._log.forget(below)

    async def _fetch(
        self, begin: int, want: int, from_first: bool
    ) -> tuple[list[bytes], list[int]]:
        if self._pull is None or self._next != begin:
            await self._drop_consumer()
            self._pull = await self._consumer(begin)
        pull = self._pull
        pull.start(want)
        request = orjson.dumps({"batch": want, "expires": int(_FETCH_TIMEOUT * 1e9)})
        await self._nc.publish(pull.subject, request, reply=pull.inbox)
        try:
            await asyncio.wait_for(pull.done.wait(), _FETCH_TIMEOUT + 2.0)
        except asyncio.TimeoutError:
            pull.stale = True  # a late delivery must not reach the next read
        values, seqs = pull.values, pull.seqs
        if pull.stale or (pull.status or "").startswith("409"):
            await self._drop_consumer()
        expected = begin if not (from_first and seqs) else seqs[0]
        for i, seq in enumerate(seqs):
            if seq != expected + i and self.source.on_lost == "error":
                await self._drop_consumer()
                raise SourceError(
                    f"{self.where}: sequences {expected + i}..{seq - 1} are missing (deleted "
                    f"or expired) before sequence {seq}; fix: restore them, reset the job's "
                    "offsets past them, or opt into NatsSource(..., on_lost='earliest' or "
                    "'latest')"
                )
        self._next = seqs[-1] + 1 if seqs else begin
        return values, seqs

    async def _consumer(self, begin: int) -> _Pull:
        """An ephemeral pull consumer from ``begin`` (no acks) and a callback-fed inbox."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        name = self._nc._nuid.next().decode()
        config = ConsumerConfig(
            name=name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=begin,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        )
        await self._js.add_consumer(self.source.stream, config=config)
        pull = _Pull(f"$JS.API.CONSUMER.MSG.NEXT.{self.source.stream}.{name}", name)
        pull.inbox = self._nc.new_inbox()
        pull.sub = await self._nc.subscribe(pull.inbox, cb=pull.deliver)
        return pull

    async def _sequence_at(self, when: datetime) -> int:
        """Create an ephemeral consumer starting at ``when`` and read where JetStream put it
        (its info reports the sequence before its first message); delete it again."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=when,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        )
        info = await self._js.add_consumer(self.source.stream, config=config)
        with contextlib.suppress(Exception):  # best effort: it expires when inactive
            await self._js.delete_consumer(self.source.stream, info.name)
        return int(info.delivered.stream_seq) + 1

    async def _drop_consumer(self) -> None:
        pull, self._pull, self._next = self._pull, None, -1
        if pull is not None:
            # best effort: the server forgets the consumer after its inactive_threshold
            with contextlib.suppress(Exception):
                await pull.sub.unsubscribe()
                await self._js.delete_consumer(self.source.stream, pull.name)

    async def _close(self) -> None:
        await self._drop_consumer()
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    # -- the runtime side ------------------------------------------------------------------

    def read_raw(self, start: int, max_records: int) -> JsonPayloads:
        """The message data of sequences ``start ..`` (at most ``max_records``), undecoded."""
        try:
            return self._loop.run(self._read(start, max(1, max_records)), self._timeout)
        except SourceError:
            raise
        except Exception as exc:
            raise self._failed(f"reading from sequence {start}", exc) from exc

    def _failed(self, what: str, exc: Exception) -> SourceError:
        """``exc`` as a SourceError; SourceUnreachable when the server is not there."""
        text = f"{self.where}: {what} failed: {type(exc).__name__}: {exc}"
        if _unreachable(exc) or (self._nc is not None and not self._nc.is_connected):
            return SourceUnreachable(text + "; the server is not reachable")
        return SourceError(text)

    def read(self, start: int, max_records: int) -> ReadResult:
        """Like :meth:`read_raw`, decoded."""
        raw = self.read_raw(start, max_records)
        return ReadResult(raw.records(), raw.end, raw.head)

    def sequence_at(self, when: datetime) -> int:
        """The sequence of the first message stored at or after ``when``."""
        try:
            return self._loop.run(self._sequence_at(when), self._timeout)
        except SourceError:
            raise
        except Exception as exc:
            raise self._failed(f"finding the first message at {when.isoformat()}", exc) from exc

    def head(self) -> int | None:
        """The stream's last sequence + 1."""
        try:
            return self._loop.run(self._state(), self._timeout)[1] + 1
        except SourceError:
            raise
        except Exception as exc:
            raise self._failed("reading the stream's state", exc) from exc

    def close(self) -> None:
        """Delete the consumer, close the connection and stop the loop thread."""
        with contextlib.suppress(Exception):  # closing is best effort
            self._loop.run(self._close(), self._timeout)
        self._loop.stop()


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the server cannot be reached (closed, timed out, no servers)."""
    from nats import errors

    kinds = (
        errors.ConnectionClosedError,
        errors.NoServersError,
        errors.TimeoutError,
        errors.StaleConnectionError,
        errors.ConnectionReconnectingError,
        errors.OutboundBufferLimitError,
        errors.NoRespondersError,
        asyncio.TimeoutError,
        concurrent.futures.TimeoutError,
        OSError,
    )
    return isinstance(exc, kinds)

"""A Kafka topic as a source: one pgstream partition per Kafka partition.

Offsets are Kafka offsets and live in PostgreSQL only: a reader ``assign``\\ s its partition
and ``seek``\\ s to the committed offset; no consumer group is joined and nothing is committed
to Kafka. A batch covers an offset range, not a count: ``read_committed`` consumers never see
transaction markers or aborted records, so offsets may skip.

"Caught up" is never decided from the high watermark a broker reports for a partition (some
brokers report a lagging one): a read that returns nothing means nothing new yet, and the end
of a read moves past skipped offsets only up to the end-of-partition event that follows the
records the consumer actually returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import psycopg

from pgstream.errors import ConfigError
from pgstream.sources.base import (
    OnLost,
    OpenContext,
    PartitionReader,
    ReadResult,
    Record,
    Skip,
    SkipLog,
    Source,
    SourceError,
    SourceRecord,
    SourceUnreachable,
    check_on_lost,
    epoch_ms,
)
from pgstream.sources.raw import JsonPayloads

__all__ = ["KafkaReader", "KafkaSource"]

log = logging.getLogger(__name__)

Decoder = Callable[[bytes], Record]

_IDLE_WAIT = 1.0  # how long a read waits for a record or the end of the partition

_INSTALL = "KafkaSource needs confluent-kafka: pip install 'pgstream-engine[kafka]'"


def _kafka() -> Any:
    """The confluent_kafka module, imported on first use (an optional dependency)."""
    try:
        import confluent_kafka
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(_INSTALL) from None
    return confluent_kafka


class KafkaSource(Source):
    """Records from a Kafka topic; partitions are named ``"0"``, ``"1"``, ... like Kafka's.

    Values are JSON objects by default (a value that is not one goes to the dead letters);
    ``value=`` takes any ``bytes -> dict`` decoder instead (an exception it raises
    dead-letters the message). ``metadata=True`` adds ``_key`` (the key as text, ``None`` if
    absent), ``_timestamp`` (epoch milliseconds) and ``_headers`` (a dict of text values) to
    every record. ``config`` passes extra librdkafka settings (security, timeouts, ...).

    A partition the job has not read yet starts at its earliest retained offset. A committed
    offset that is no longer retained stops the job with :class:`SourceError` unless
    ``on_lost`` is ``"earliest"`` (continue at the earliest retained offset) or ``"latest"``
    (continue at the partition's end); the skipped range is recorded. A committed offset
    past the end of the partition (the topic was recreated) always stops the job. A broker
    that cannot be reached raises :class:`SourceUnreachable` (retried by the runtime).
    """

    kind = "kafka"

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: str,
        value: Decoder | None = None,
        metadata: bool = False,
        isolation_level: str = "read_committed",
        config: Mapping[str, Any] | None = None,
        timeout: float = 10.0,
        on_lost: OnLost = "error",
    ) -> None:
        if not topic:
            raise ConfigError("KafkaSource needs a topic name")
        if not bootstrap_servers:
            raise ConfigError(f"KafkaSource({topic!r}) needs bootstrap_servers='host:port'")
        if isolation_level not in ("read_committed", "read_uncommitted"):
            raise ConfigError(
                f"KafkaSource({topic!r}): isolation_level must be 'read_committed' or "
                f"'read_uncommitted', not {isolation_level!r}"
            )
        if value is not None and not callable(value):
            raise ConfigError(f"KafkaSource({topic!r}): value= must be a bytes -> dict function")
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.value = value
        self.metadata = metadata
        self.isolation_level = isolation_level
        self.config = dict(config or {})
        self.timeout = timeout
        self.on_lost = check_on_lost(f"KafkaSource({topic!r})", on_lost)

    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka settings of a reader's consumer."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": f"pgstream-{self.topic}",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
            "isolation.level": self.isolation_level,
            "fetch.queue.backoff.ms": 5,  # librdkafka's 1 s default stalls a catching-up reader
            "fetch.wait.max.ms": 100,
            "logger": log,  # librdkafka's log lines go to Python logging, not stderr
            **self.config,
        }

    def admin_config(self) -> dict[str, Any]:
        """The librdkafka settings of the admin client that reads the topic id: the
        bootstrap servers and the connection settings (security, SASL, SSL, client id)."""
        keep = ("security.", "sasl.", "ssl.", "client.id", "socket.")
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "logger": log,
            **{k: v for k, v in self.config.items() if k.startswith(keep)},
        }

    def single_partition(self) -> bool:
        """A topic may have (and gain) several partitions."""
        return False

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """The topic's partitions, asked of the broker."""
        return [str(p) for p in self._partition_ids()]

    def _partition_ids(self) -> list[int]:
        kafka = _kafka()
        consumer = kafka.Consumer(self.consumer_config())
        try:
            md = consumer.list_topics(self.topic, timeout=self.timeout)
        except kafka.KafkaException as exc:
            raise SourceError(
                f"cannot reach the Kafka broker at {self.bootstrap_servers} for topic "
                f"{self.topic!r}: {exc.args[0]}; fix: start the broker or correct "
                "bootstrap_servers"
            ) from None
        finally:
            consumer.close()
        meta = md.topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise SourceError(
                f"Kafka topic {self.topic!r} does not exist on {self.bootstrap_servers}"
                + (f" ({meta.error.str()})" if meta is not None and meta.error else "")
                + "; fix: create the topic or correct the name given to KafkaSource"
            )
        return sorted(meta.partitions)

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Raise :class:`SourceError` if the broker or the topic cannot be reached."""
        self._partition_ids()

    def initial_offset(self, partition: str) -> int:
        """0: a partition not read yet starts at its earliest retained offset."""
        return 0

    def offset_at(self, partition: str, when: datetime, context: OpenContext) -> int | None:
        """The earliest offset of ``partition`` whose message timestamp is at or after
        ``when`` (the broker's ``offsets_for_times``), the partition's end offset when no
        message is that recent."""
        kafka = _kafka()
        consumer = kafka.Consumer(self.consumer_config())
        where = f"Kafka topic {self.topic!r} partition {partition}"
        try:
            tp = kafka.TopicPartition(self.topic, int(partition), epoch_ms(when))
            found = consumer.offsets_for_times([tp], timeout=self.timeout)[0]
            if found.error is not None:
                raise SourceError(f"cannot map a time to an offset of {where}: {found.error}")
            if found.offset >= 0:
                return int(found.offset)
            _, high = consumer.get_watermark_offsets(tp, timeout=self.timeout)
            return int(high)
        except ValueError:
            raise SourceError(f"{self.describe()} has no partition {partition!r}") from None
        except kafka.KafkaException as exc:
            raise SourceError(
                f"cannot map a time to an offset of {where}: {exc.args[0]}"
            ) from None
        finally:
            consumer.close()

    def open(self, partition: str, context: OpenContext) -> KafkaReader:
        """Open a consumer assigned to ``partition`` (``context`` is unused)."""
        try:
            number = int(partition)
        except ValueError:
            raise SourceError(f"{self.describe()} has no partition {partition!r}") from None
        if self.value is None and not self.metadata:
            return KafkaRawReader(self, number)
        return KafkaReader(self, number)

    def identity(self) -> str:
        """``kafka <bootstrap servers> topic <topic>``."""
        return f"kafka {self.bootstrap_servers} topic {self.topic}"

    def describe(self) -> str:
        """``kafka topic <topic>``."""
        return f"kafka topic {self.topic}"

    def __repr__(self) -> str:
        return f"KafkaSource({self.topic!r}, bootstrap_servers={self.bootstrap_servers!r})"


class KafkaReader(PartitionReader):
    """Reads one Kafka partition from an offset through its own assigned consumer."""

    def __init__(self, source: KafkaSource, partition: int) -> None:
        self.source = source
        self.partition = partition
        self.where = f"Kafka topic {source.topic!r} partition {partition}"
        self._kafka = _kafka()
        self._down: str | None = None  # a lost connection librdkafka told of (error_cb)
        self._topic_id: str | None = None  # "" once known to be unknown
        config = source.consumer_config()
        config.setdefault("error_cb", self._on_error)
        self._consumer = self._kafka.Consumer(config)
        self._next: int | None = None  # the offset the consumer delivers next
        self._eof: int | None = None  # the end-of-partition offset seen after the last record
        self._head: int | None = None
        self._pending: list[Any] = []  # messages read while positioning, not returned yet
        self._floor = 0  # after a skip: a read from the committed offset ends at least here
        self._log = SkipLog()

    def retained_from(self) -> int | None:
        """The partition's earliest retained offset."""
        return self._watermarks()[0]

    def instance(self) -> str | None:
        """``topic id <id>`` (a recreated topic has a new one), asked of the broker once per
        reader; None when the broker does not tell topic ids."""
        if self._topic_id is None:
            self._topic_id = self._describe_topic_id()
        return self._topic_id or None

    def _describe_topic_id(self) -> str:
        import confluent_kafka.admin

        admin = confluent_kafka.admin.AdminClient(self.source.admin_config())
        topics = self._kafka.TopicCollection([self.source.topic])
        try:
            futures = admin.describe_topics(topics, request_timeout=self.source.timeout)
            found = futures[self.source.topic].result(self.source.timeout)
        except self._kafka.KafkaException as exc:
            error = exc.args[0]
            if self._is_missing(error):
                raise SourceError(f"{self.where} does not exist any more") from None
            if hasattr(error, "code") and error.code() in self._unreachable_codes():
                raise SourceUnreachable(f"cannot describe {self.where}: {error}") from None
            return ""  # the broker cannot describe topics: no instance check
        topic_id = getattr(found, "topic_id", None)
        return f"topic id {topic_id}" if topic_id is not None else ""

    def _on_error(self, err: Any) -> None:
        """librdkafka's error callback: notes a lost connection. librdkafka keeps reconnecting
        meanwhile; until an end-of-partition event proves a fetch got through again, a read
        that gets nothing raises :class:`SourceUnreachable` instead of reporting "nothing
        new" (messages fetched before the loss are still delivered)."""
        e = self._kafka.KafkaError
        if err.code() in (e._ALL_BROKERS_DOWN, e._TRANSPORT):
            self._down = err.str()

    # -- positioning --------------------------------------------------------------------------

    def _tp(self, offset: int) -> Any:
        return self._kafka.TopicPartition(self.source.topic, self.partition, offset)

    def _watermarks(self) -> tuple[int, int]:
        try:
            low, high = self._consumer.get_watermark_offsets(
                self._tp(0), timeout=self.source.timeout
            )
        except self._kafka.KafkaException as exc:
            error = exc.args[0]
            kind = SourceError if self._is_missing(error) else SourceUnreachable
            raise kind(f"cannot read the offsets of {self.where}: {error}") from None
        return int(low), int(high)

    def _is_missing(self, error: Any) -> bool:
        e = self._kafka.KafkaError
        codes = (e.UNKNOWN_TOPIC_OR_PART, e._UNKNOWN_TOPIC)
        return hasattr(error, "code") and error.code() in codes

    def _position(self, start: int) -> None:
        """Assign the consumer at ``start``, failing if records from ``start`` on are gone."""
        self._eof, self._pending, self._floor = None, [], 0
        low, high = self._watermarks()
        if start <= 0 or start == low:  # nothing before the log start to check against
            self._consumer.assign([self._tp(max(0, low))])
            self._next = start
            return
        if low > start:
            if self.source.on_lost == "error":
                self._not_retained(start, low)
            self._skip_to(start, low, high)
            return
        # The record before ``start`` ended the last batch: it (or a transaction marker) must
        # exist, so reading from it tells a live partition from a recreated, shorter one.
        self._consumer.assign([self._tp(start - 1)])
        deadline = time.monotonic() + self.source.timeout
        while time.monotonic() < deadline:
            msg = self._consumer.poll(0.1)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                if msg.offset() >= start:
                    self._pending.append(msg)
            elif err.code() == self._kafka.KafkaError._PARTITION_EOF:
                if msg.offset() < start:
                    self._past_end(start, int(msg.offset()))
                self._eof = self._head = int(msg.offset())
            else:
                self._raise(err, start)
            self._next = start
            return
        if self._down is not None:  # the broker went away while positioning
            raise SourceUnreachable(f"cannot read {self.where}: {self._down}")
        self._past_end(start, high)

    def _skip_to(self, start: int, low: int, high: int) -> None:
        """Under a reset policy: record ``[start, low)`` (to ``high`` under ``"latest"``) as
        skipped and continue reading there."""
        to = max(low, high) if self.source.on_lost == "latest" else low
        detail = f"the earliest retained offset is {low}, the end offset {high}"
        self._log.add(Skip(start, to, "retention", detail, self.source.on_lost))
        log.warning("%s: offsets [%d, %d) are gone; on_lost=%r skips them", self.where,
                    start, to, self.source.on_lost)
        self._consumer.assign([self._tp(to)])
        self._next, self._floor = start, to

    def skips(self, start: int, end: int) -> list[Skip]:
        """The ranges the ``on_lost`` policy skipped from ``[start, end)``."""
        return self._log.within(start, end)

    def forget_skips(self, below: int) -> None:
        """Their batch committed."""
        self._log.forget(below)

    def _past_end(self, start: int, end: int) -> NoReturn:
        raise SourceError(
            f"offsets jumped in {self.where}: the committed offset {start} is past the end "
            f"of the partition (the broker reports end offset {end}); the topic was recreated "
            "or truncated. fix: restore the topic, or reset this job's offsets for the stream "
            "if the new topic is meant to be read from its start (pgstream job reset "
            "MODULE:APP --stream S --yes; on_lost does not apply)"
        )

    def _not_retained(self, start: int, low: int) -> NoReturn:
        raise SourceError(
            f"offsets jumped in {self.where}: the committed offset is {start} but the "
            f"earliest retained offset is {low} (retention deleted the records in between). "
            "fix: raise the topic's retention so the job keeps up, reset this job's "
            "offsets for the stream, or accept the loss with KafkaSource(..., "
            "on_lost='earliest' or 'latest')"
        )

    def _raise(self, err: Any, start: int) -> NoReturn:
        if err.code() == self._kafka.KafkaError._AUTO_OFFSET_RESET:
            # the broker says the fetch offset is out of range: below its log start or past
            # its end (``auto.offset.reset`` is "error", so the consumer never jumps)
            low, high = self._watermarks()
            if low > start:
                self._not_retained(start, low)
            self._past_end(start, high)
        if err.code() == self._kafka.KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise SourceError(f"{self.where} does not exist any more; fix: recreate the topic")
        if err.code() in self._unreachable_codes() or err.retriable():
            raise SourceUnreachable(f"cannot read {self.where}: {err.str()}")
        raise SourceError(f"error reading {self.where}: {err.str()}")

    def _unreachable_codes(self) -> tuple[int, ...]:
        e = self._kafka.KafkaError
        return (e._TRANSPORT, e._ALL_BROKERS_DOWN, e._TIMED_OUT, e._RESOLVE, e.NETWORK_EXCEPTION)

    # -- reading ------------------------------------------------------------------------------

    def _messages(self, start: int, max_records: int) -> tuple[list[Any], int]:
        """Up to ``max_records`` messages from ``start`` and the end offset they cover."""
        if start != self._next:
            self._position(start)
        messages: list[Any] = self._pending[:max_records]
        del self._pending[:max_records]
        end = int(messages[-1].offset()) + 1 if messages else max(start, self._floor)
        deadline = time.monotonic() + _IDLE_WAIT
        while len(messages) < max_records:
            # an end-of-partition event after every record delivered: nothing more is there
            at_eof = self._eof is not None
            wait = 0.0 if messages or at_eof else 0.1
            batch = self._consumer.consume(max_records - len(messages), wait)
            if not batch:
                if messages or at_eof or time.monotonic() >= deadline:
                    break
                continue
            for msg in batch:
                err = msg.error()
                if err is None:
                    messages.append(msg)
                    end = int(msg.offset()) + 1
                    self._eof = None
                elif err.code() == self._kafka.KafkaError._PARTITION_EOF:
                    self._eof = self._head = int(msg.offset())
                    self._down = None
                elif self._lost_meanwhile(err):
                    self._next = None  # the next read positions again (and skips)
                    return messages, end
                else:
                    self._raise(err, end)
        if self._eof is not None and self._eof > end:
            end = self._eof  # markers or aborted records, never delivered: skip past them
        if not messages and end == start and self._down is not None:
            self._next = None  # a new consumer positions again
            raise SourceUnreachable(f"cannot read {self.where}: {self._down}")
        self._next = end
        return messages, end

    def _lost_meanwhile(self, err: Any) -> bool:
        """A fetch fell below the log start (retention ran while reading) and a reset policy
        is set: the records read so far stand, the next read skips."""
        return bool(
            err.code() == self._kafka.KafkaError._AUTO_OFFSET_RESET
            and self.source.on_lost != "error"
        )

    def read(self, start: int, max_records: int) -> ReadResult:
        """Records from offset ``start``, decoded with the source's decoder."""
        messages, end = self._messages(start, max_records)
        return ReadResult([self._record(m) for m in messages], end, self.head())

    def _record(self, msg: Any) -> SourceRecord:
        offset, payload = int(msg.offset()), msg.value() or b""
        if self.source.value is None:
            record = JsonPayloads([payload], [offset], offset, offset + 1).decode(0)
        else:
            record = self._decoded(offset, payload, self.source.value)
        if self.source.metadata and record.value is not None:
            key = msg.key()
            record.value["_key"] = None if key is None else key.decode("utf-8", "replace")
            record.value["_timestamp"] = msg.timestamp()[1]
            record.value["_headers"] = {
                k: (None if v is None else v.decode("utf-8", "replace"))
                for k, v in (msg.headers() or [])
            }
        return record

    @staticmethod
    def _decoded(offset: int, payload: bytes, decoder: Decoder) -> SourceRecord:
        try:
            value = decoder(payload)
        except Exception as exc:
            error = f"message at offset {offset} could not be decoded: {exc!r}"
            return SourceRecord(offset, None, raw=payload, error=error)
        if not isinstance(value, dict):
            error = f"the decoder returned {type(value).__name__} for the message at offset " \
                f"{offset}, not a dict"
            return SourceRecord(offset, None, raw=payload, error=error)
        return SourceRecord(offset, value)

    def head(self) -> int | None:
        """The end of the partition, as the last end-of-partition event told (for lag)."""
        return self._head

    def close(self) -> None:
        """Close the consumer (nothing is committed to Kafka)."""
        self._consumer.close()


class KafkaRawReader(KafkaReader):
    """A reader that hands JSON values over undecoded (the runtime's fast path)."""

    def read_raw(self, start: int, max_records: int) -> JsonPayloads:
        """Like :meth:`read`: the message values and their offsets, not decoded yet."""
        messages, end = self._messages(start, max_records)
        values = [m.value() or b"" for m in messages]
        offsets = [int(m.offset()) for m in messages]
        return JsonPayloads(values, offsets, start, end, self.head())

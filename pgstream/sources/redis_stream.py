"""A Redis stream as a source (redis-py, extra ``redis``).

A stream key is one partition, ``"0"`` (a stream is ordered as a whole; to spread a job over
workers, use several keys). The offset of an entry is its id ``ms-seq`` as one ordered bigint,
``ms * 2**20 + seq``: ids and offsets sort alike, and a committed offset is the id right after
the last entry read (``XRANGE`` from it is inclusive). An id whose ``seq`` is ``2**20`` or more
(explicit ids only; Redis gives ``seq`` 0, 1, ... within a millisecond) is refused with a
:class:`SourceError`.

By default an entry's field ``data`` holds the record as JSON (``field="data"``; an entry
without it, or with a value that is not one JSON object, goes to the dead letters). With
``field=None`` the entry's fields are the record: a dict of field -> value, both decoded as
UTF-8 text.

Each read runs ``XRANGE`` and ``XINFO STREAM`` in one ``MULTI``, so it sees the stream at one
instant, and fails loudly (:class:`SourceError`) when entries the job has not read may be gone:

* trimmed (``XTRIM``, ``XADD MAXLEN/MINID``): the last entry the job read is no longer in the
  stream (its first entry is above the committed id, or it is empty though entries were added
  after). Trimming removes the oldest entries, so while that entry is kept nothing unread was
  trimmed. Conservative: when exactly the read entries were trimmed, pgstream cannot tell and
  stops too; keep MAXLEN/MINID behind the job's lag.
* deleted (``XDEL``): Redis records the largest id it ever deleted (``max-deleted-entry-id``,
  Redis >= 7); at or above the committed offset means an unread entry was deleted.
* recreated: the committed id is above the stream's last id, or the last entry the job read
  is missing from a stream that never lost an entry (``entries-added`` equals its length).

``on_lost="earliest"`` continues after trimmed entries at the stream's first entry (skipping
``[committed, first)``) and accepts deleted ones (recording ``[committed, largest deleted
id]`` as possibly skipped); ``on_lost="latest"`` skips to the stream's end. Either records
the skipped range (:class:`~pgstream.sources.base.Skip`). A recreated stream always stops
the job. A server that cannot be reached raises
:class:`~pgstream.sources.base.SourceUnreachable` (retried by the runtime).

A job with nothing committed starts at the stream's first entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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

__all__ = ["RedisStreamReader", "RedisStreamSource", "id_to_offset", "offset_to_id"]

SEQ_BITS = 20
_SEQ_MASK = (1 << SEQ_BITS) - 1


def id_to_offset(entry_id: bytes | str) -> int:
    """``ms-seq`` -> ``ms * 2**20 + seq``; SourceError if ``seq`` does not fit."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    s = int(seq or 0)
    if s > _SEQ_MASK:
        raise SourceError(
            f"Redis stream entry id {text} has a sequence number above {_SEQ_MASK}; "
            "RedisStreamSource maps ids to ms * 2**20 + seq and cannot represent it"
        )
    return (int(ms) << SEQ_BITS) | s


def offset_to_id(offset: int) -> str:
    """The inverse of :func:`id_to_offset`."""
    return f"{offset >> SEQ_BITS}-{offset & _SEQ_MASK}"


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError(
            "RedisStreamSource needs the redis package; fix: pip install 'pgstream-engine[redis]'"
        ) from None
    return redis


def _redacted(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisStreamSource(Source):
    """Entries of the Redis stream at ``key`` (see the module docstring); ``on_lost`` is
    what to do when unread entries were trimmed or deleted."""

    kind = "redis"

    def __init__(
        self,
        key: str,
        *,
        url: str = "redis://127.0.0.1:6379",
        field: str | None = "data",
        connect_timeout: float = 5.0,
        on_lost: OnLost = "error",
    ) -> None:
        if not key:
            raise ConfigError("RedisStreamSource: the stream key is empty")
        if field == "":
            raise ConfigError("RedisStreamSource: field= is empty; give a field name or None")
        self.key = key
        self.url = url
        self.field = field
        self.connect_timeout = connect_timeout
        self.on_lost = check_on_lost(f"RedisStreamSource({key!r})", on_lost)

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """A stream key is one partition, ``"0"``."""
        return ["0"]

    def initial_offset(self, partition: str) -> int:
        """0: nothing committed, start at the stream's first entry."""
        return 0

    def open(self, partition: str, context: OpenContext) -> RedisStreamReader:
        """Connect and return a reader of the stream (``context`` is unused)."""
        if partition != "0":
            raise SourceError(f"{self.describe()} has only partition '0', not {partition!r}")
        reader = RedisStreamReader(self)
        try:
            reader.info()
        except BaseException:
            reader.close()
            raise
        return reader

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Raise :class:`SourceError` if the server is unreachable or the stream missing."""
        self.open("0", OpenContext("")).close()

    def offset_at(self, partition: str, when: datetime, context: OpenContext) -> int | None:
        """The offset of id ``<ms>-0``, ``ms`` being ``when`` in epoch milliseconds: Redis
        ids start with the time the entry was added (ids given explicitly to ``XADD`` are
        taken at their word), so every entry at or after ``when`` is at this offset or
        later. No request to the server is needed."""
        return max(0, epoch_ms(when)) << SEQ_BITS

    def identity(self) -> str:
        """``redis <url without password> stream <key>``."""
        return f"redis {_redacted(self.url)} stream {self.key}"

    def describe(self) -> str:
        """``redis stream <key>``."""
        return f"redis stream {self.key}"

    def __repr__(self) -> str:
        return f"RedisStreamSource({self.key!r}, url={_redacted(self.url)!r})"


@dataclass(slots=True)
class RedisPayloads(JsonPayloads):
    """Entries' JSON values; ``missing`` holds the indexes of entries without the field."""

    missing: dict[int, str] = field(default_factory=dict)

    def decode(self, index: int) -> SourceRecord:
        """Entry ``index`` decoded; an error record if it lacks the field."""
        if index in self.missing:
            pos = self.offset_list[index]
            error = f"entry at offset {pos} has no field {self.missing[index]!r}"
            return SourceRecord(pos, None, raw=self.values[index], error=error)
        return JsonPayloads.decode(self, index)

    def extend(self, more: Any) -> None:
        """Append the entries of the read that continued where this one ended."""
        base = len(self.values)
        JsonPayloads.extend(self, more)
        if isinstance(more, RedisPayloads):
            self.missing.update({base + i: f for i, f in more.missing.items()})


class RedisStreamReader(PartitionReader):
    """Reads one Redis stream with ``XRANGE`` from the committed id."""

    def __init__(self, source: RedisStreamSource) -> None:
        self.source = source
        self.where = f"Redis stream {source.key!r} on {_redacted(source.url)}"
        redis = _redis()
        self._errors = redis.exceptions
        try:
            self._client = redis.Redis.from_url(
                source.url,
                socket_connect_timeout=source.connect_timeout,
                socket_timeout=source.connect_timeout + 25.0,
            )
        except ValueError as exc:
            raise ConfigError(
                f"RedisStreamSource: bad url {_redacted(source.url)!r}: {exc}"
            ) from None
        self._field = source.field.encode() if source.field is not None else None
        self._log = SkipLog()
        self._deleted_ok = -1  # deletions up to this offset were accepted (on_lost policy)

    def _call(self, *commands: tuple[str, tuple[Any, ...], dict[str, Any]]) -> list[Any]:
        """Run ``commands`` in one MULTI; translate connection and missing-key errors."""
        pipe = self._client.pipeline(transaction=True)
        for name, args, kwargs in commands:
            getattr(pipe, name)(*args, **kwargs)
        try:
            return list(pipe.execute())
        except (self._errors.ConnectionError, self._errors.TimeoutError) as exc:
            raise SourceUnreachable(
                f"cannot reach the Redis server {_redacted(self.source.url)} for stream "
                f"{self.source.key!r}: {exc}; fix: start the server or correct url="
            ) from None
        except self._errors.ResponseError as exc:
            if "no such key" in str(exc).lower():
                raise SourceError(
                    f"{self.where} does not exist; fix: add entries to it (XADD "
                    f"{self.source.key} * data ...) or correct the key given to "
                    "RedisStreamSource"
                ) from None
            raise SourceError(f"{self.where}: {exc}") from None

    def info(self) -> dict[Any, Any]:
        """``XINFO STREAM`` of the key."""
        info: dict[Any, Any] = self._call(("xinfo_stream", (self.source.key,), {}))[0]
        return info

    def _check(self, start: int, info: dict[Any, Any]) -> tuple[int, int | None]:
        """The head offset, and where the stream skips to under the ``on_lost`` policy
        (``None``: read on from ``start``); SourceError if entries from ``start`` on may be
        gone and the policy is ``"error"``."""
        last = id_to_offset(info["last-generated-id"])
        if start > last + 1:
            raise SourceError(
                f"{self.where}: the committed id {offset_to_id(start)} is beyond the stream's "
                f"last id {_text(info['last-generated-id'])} (the key was deleted and "
                "recreated); fix: reset the job's offsets if the new stream is meant "
                "(pgstream job reset MODULE:APP --stream S --yes; on_lost does not apply)"
            )
        if start <= 0:
            return last + 1, None
        first = info.get("first-entry")
        # the entry at ``start`` itself (the first unread one) may be the first: nothing lost
        gone = last >= start if not first else id_to_offset(first[0]) > start
        if gone and _never_shrank(info):
            raise SourceError(
                f"{self.where}: the last entry the job read (before {offset_to_id(start)}) was "
                "never in this stream: nothing was ever trimmed or deleted from it, so the key "
                "was deleted and recreated; fix: reset the job's offsets if the new stream is "
                "meant (pgstream job reset MODULE:APP --stream S --yes; on_lost does not apply)"
            )
        if gone:
            now = f"now starts at {_text(first[0])}" if first else "is now empty"
            if self.source.on_lost == "error":
                raise SourceError(
                    f"{self.where} was trimmed past the committed id {offset_to_id(start)}: "
                    f"the last entry the job read is gone and the stream {now}, so unread "
                    "entries may be lost; fix: trim only entries the job has read (keep "
                    "MAXLEN/MINID behind its lag), reset the job's offsets, or opt into "
                    "RedisStreamSource(..., on_lost='earliest' or 'latest')"
                )
            to = id_to_offset(first[0]) if first else last + 1
            return last + 1, self._skip(start, to, last, "retention", f"the stream {now}")
        deleted = info.get("max-deleted-entry-id")
        if deleted is None or id_to_offset(deleted) < start:
            return last + 1, None
        if id_to_offset(deleted) <= self._deleted_ok:
            return last + 1, None
        if self.source.on_lost == "error":
            _check_deleted(self.where, start, deleted)
        self._deleted_ok = id_to_offset(deleted)
        detail = f"entries up to id {_text(deleted)} were deleted (XDEL)"
        return last + 1, self._skip(start, self._deleted_ok + 1, last, "deleted", detail)

    def _skip(self, start: int, to: int, last: int, reason: str, detail: str) -> int | None:
        """Record the skip of ``[start, to)`` (to the end under ``"latest"``); where reading
        continues (None: at ``start``, the lost entries are simply not there)."""
        if self.source.on_lost == "latest":
            to = max(to, last + 1)
        if to > start:
            self._log.add(Skip(start, to, reason, detail, self.source.on_lost))
        return last + 1 if self.source.on_lost == "latest" else None

    def retained_from(self) -> int | None:
        """The offset of the stream's first entry (after its last id when it is empty)."""
        info = self.info()
        first = info.get("first-entry")
        return id_to_offset(first[0]) if first else id_to_offset(info["last-generated-id"]) + 1

    def skips(self, start: int, end: int) -> list[Skip]:
        """The ranges the ``on_lost`` policy skipped from ``[start, end)``."""
        return self._log.within(start, end)

    def forget_skips(self, below: int) -> None:
        """Their batch committed."""
        self._log.forget(below)

    def read_raw(self, start: int, max_records: int) -> RedisPayloads:
        """Up to ``max_records`` entries from offset ``start``, their values undecoded."""
        low = offset_to_id(start) if start > 0 else "-"
        entries, info = self._call(
            ("xrange", (self.source.key,), {"min": low, "count": max(1, max_records)}),
            ("xinfo_stream", (self.source.key,), {}),
        )
        head, skip_to = self._check(start, info)
        batch = RedisPayloads([], [], start, start, head)
        if skip_to is not None:  # on_lost="latest": nothing before the end is read
            batch.end = skip_to
            return batch
        name = self._field
        for entry_id, fields in entries:
            if name is None:
                value = _fields_json(fields)
            elif name in fields:
                value = fields[name]
            else:
                batch.missing[len(batch.values)] = name.decode()
                value = b""
            batch.values.append(value)
            batch.offset_list.append(id_to_offset(entry_id))
        if batch.offset_list:
            batch.end = batch.offset_list[-1] + 1
        else:  # nothing from ``start`` on: a skip starting there can be committed at once
            batch.end = max([start] + [k.end for k in self._log.within(start, start + 1)])
        return batch

    def read(self, start: int, max_records: int) -> ReadResult:
        """Like :meth:`read_raw`, decoded."""
        raw = self.read_raw(start, max_records)
        return ReadResult(raw.records(), raw.end, raw.head)

    def head(self) -> int | None:
        """The offset after the stream's last id."""
        return id_to_offset(self.info()["last-generated-id"]) + 1

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def _check_deleted(where: str, start: int, deleted: Any) -> None:
    """SourceError if ``XDEL`` removed an entry at or after ``start``."""
    if deleted is not None and id_to_offset(deleted) >= start:
        raise SourceError(
            f"{where}: entries at or after the committed id {offset_to_id(start)} were deleted "
            f"(the largest deleted id is {_text(deleted)}); fix: delete only entries the job "
            "has read, reset the job's offsets, or opt into RedisStreamSource(..., "
            "on_lost='earliest' or 'latest')"
        )


def _never_shrank(info: dict[Any, Any]) -> bool:
    """Whether no entry was ever trimmed or deleted from the stream (Redis >= 7 counts every
    entry added; an unknown count says nothing)."""
    added = info.get("entries-added")
    return added is not None and int(added) == int(info.get("length", -1))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields_json(fields: dict[bytes, bytes]) -> bytes:
    """An entry's fields as one JSON object of text values (``field=None``)."""
    import orjson

    record: Record = {
        k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()
    }
    return orjson.dumps(record)

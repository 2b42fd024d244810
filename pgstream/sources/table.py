"""A PostgreSQL table as a single-partition source, ordered by an increasing integer column.

The hard part is invariant 6 (never skip a row that becomes visible later). Values of a
``bigserial``/identity column are handed out *before* the inserting transaction commits, so
the row with id 6 can become visible before the row with id 5. A reader that simply resumed
after the largest id it has seen would skip 5 forever. :class:`TableReader` therefore only reads
below a *safe horizon*, an offset below which no row can still appear; see its docstring.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, tuple_row

from pgstream.db.names import parse_table_name
from pgstream.errors import ConfigError
from pgstream.sources.base import PartitionReader, ReadResult, Source, SourceError, SourceRecord

__all__ = ["TableReader", "TableSource", "parse_table_name"]

log = logging.getLogger(__name__)

MIN_OFFSET = -(2**63)
T = TypeVar("T")
_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


class TableSource(Source):
    """Rows of a table in order of an increasing integer ``offset_column`` (one partition "0").

    Records are the rows as dicts (only ``columns`` if given); a record's offset is its
    ``offset_column`` value and the initial offset is ``-2**63`` (read everything).

    Preconditions for exactly-once reading (see :class:`TableReader` for why):

    * the offset column is filled at insert time from a sequence or identity column (``bigserial``,
      ``GENERATED ... AS IDENTITY``) that only increases, with ``CACHE 1`` (the default);
    * rows are inserted through this table (for a partitioned table, through the parent or its
      partitions), and the table is append-only from the job's point of view (updates and deletes
      of already-read rows are not seen);
    * the offset column is indexed (btree), so every read is an index range scan.
    """

    kind = "table"

    def __init__(
        self,
        table: str,
        *,
        offset_column: str = "id",
        columns: Sequence[str] | None = None,
    ) -> None:
        if not offset_column:
            raise ConfigError("TableSource needs an offset_column name")
        self.table = table
        self.schema, self.relname = parse_table_name(table)
        self.offset_column = offset_column
        self.columns: tuple[str, ...] | None = tuple(columns) if columns is not None else None
        if self.columns is not None and not self.columns:
            raise ConfigError(f"TableSource({table!r}) got an empty columns list")

    # -- SQL building blocks -----------------------------------------------------------------

    @property
    def table_ident(self) -> sql.Identifier:
        """The table as a (possibly schema-qualified) SQL identifier."""
        if self.schema is None:
            return sql.Identifier(self.relname)
        return sql.Identifier(self.schema, self.relname)

    def regclass_text(self) -> str:
        """The table name quoted for ``::regclass`` / ``to_regclass`` (no connection needed)."""
        ident = '"' + self.relname.replace('"', '""') + '"'
        if self.schema is None:
            return ident
        return '"' + self.schema.replace('"', '""') + '".' + ident

    # -- Source --------------------------------------------------------------------------------

    def identity(self) -> str:
        """``table <schema>.<table> offset <column>``; an unqualified name counts as ``public``."""
        return f"table {self.schema or 'public'}.{self.relname} offset {self.offset_column}"

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """A table is a single partition, ``"0"``."""
        return ["0"]

    def initial_offset(self, partition: str) -> int:
        """``-2**63``: start before every possible offset."""
        return MIN_OFFSET

    def open(self, partition: str, dsn: str) -> TableReader:
        """Open a reader with its own autocommit connection to ``dsn``."""
        if partition != "0":
            raise SourceError(f"{self.describe()} has only partition '0', not {partition!r}")
        return TableReader(self, dsn)

    def describe(self) -> str:
        """``table <schema.table>``."""
        return f"table {self.table}"

    def __repr__(self) -> str:
        return f"TableSource({self.table!r}, offset_column={self.offset_column!r})"

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Check the table, the offset column (an integer) and ``columns`` exist.

        Also refuses a sequence with ``CACHE`` > 1 behind the offset column (values would not be
        handed out in commit-compatible order across sessions), and logs a warning when the offset
        column has no btree index or is not filled by a sequence. Runs only catalog queries that
        cannot fail, so it is safe inside the caller's transaction.
        """
        cur = conn.cursor(row_factory=tuple_row)
        row = cur.execute("SELECT to_regclass(%s)::oid", [self.regclass_text()]).fetchone()
        relid = row[0] if row else None
        if relid is None:
            where = (
                f"schema {self.schema!r}"
                if self.schema is not None
                else "the search_path ("
                + str(_scalar(cur, "SELECT current_setting('search_path')"))
                + ")"
            )
            raise SourceError(
                f"source table {self.table!r} does not exist (looked in {where}); "
                "fix: create it (e.g. in your migrations) or correct the name given to TableSource"
            )
        cols = cur.execute(
            """
            SELECT a.attname, a.attnum,
                   format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END,
                               NULL)
              FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
            """,
            [relid],
        ).fetchall()
        types = {name: typ for name, _, typ in cols}
        attnums = {name: num for name, num, _ in cols}
        off = self.offset_column
        if off not in types:
            raise SourceError(
                f"source table {self.table!r} has no offset column {off!r} "
                f"(its columns: {', '.join(sorted(types)) or 'none'}); fix: pass "
                "offset_column= naming an increasing integer column, e.g. a bigserial id"
            )
        if types[off] not in _INTEGER_TYPES:
            raise SourceError(
                f"offset column {off!r} of source table {self.table!r} has type {types[off]}, "
                "not an integer type; fix: use a bigint column filled by a sequence or identity "
                "(bigserial / GENERATED ALWAYS AS IDENTITY)"
            )
        if self.columns is not None:
            missing = [c for c in self.columns if c not in types]
            if missing:
                raise SourceError(
                    f"source table {self.table!r} has no column(s) "
                    f"{', '.join(map(repr, missing))}; "
                    "fix: correct the columns= given to TableSource"
                )
        indexed = _scalar(
            cur,
            """
            SELECT EXISTS (
              SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                JOIN pg_am am ON am.oid = c.relam
               WHERE i.indrelid = %s AND i.indkey[0] = %s AND am.amname = 'btree'
                 AND i.indisvalid AND i.indpred IS NULL)
            """,
            [relid, attnums[off]],
        )
        if not indexed:
            log.warning(
                "offset column %r of source table %r has no btree index: every read will scan the "
                "table; fix: CREATE INDEX ON %s (%s)",
                off,
                self.table,
                self.regclass_text(),
                sql.Identifier(off).as_string(conn),
            )
        seq = _scalar(cur, "SELECT pg_get_serial_sequence(%s, %s)", [self.regclass_text(), off])
        if seq is None:
            log.warning(
                "offset column %r of source table %r is not filled by a sequence or identity; "
                "TableSource relies on values assigned at insert time that only increase",
                off,
                self.table,
            )
            return
        cache = _scalar(
            cur, "SELECT seqcache FROM pg_sequence WHERE seqrelid = %s::regclass", [seq]
        )
        if cache is not None and cache > 1:
            raise SourceError(
                f"sequence {seq} behind offset column {off!r} of source table {self.table!r} has "
                f"CACHE {cache}: sessions then hand out ids out of order and rows could be "
                f"skipped; fix: ALTER SEQUENCE {seq} CACHE 1"
            )


def _scalar(cur: psycopg.Cursor[tuple[Any, ...]], query: str, params: Sequence[Any] = ()) -> Any:
    row = cur.execute(query, params).fetchone()
    return row[0] if row else None


@dataclass(slots=True, frozen=True)
class _Candidate:
    """``max(offset) = top`` observed in a snapshot whose xmax was ``xmax``, while the
    transactions ``writers`` held a ROW EXCLUSIVE lock on the table and the transactions
    ``xids`` (``"pid:xid"``) of the same database held an xid."""

    top: int
    xmax: int
    writers: frozenset[str]
    xids: frozenset[str]


class TableReader(PartitionReader):
    """Reads rows below a safe horizon, over its own autocommit connection.

    **Why a horizon.** Ids come from a sequence when a row is inserted, but the row becomes
    visible only when its transaction commits, in any order. Seeing ``max(id) = M`` therefore
    does not mean every id below ``M`` is visible yet.

    **The horizon.** Each read runs one statement that observes, in one snapshot ``S``:
    ``xmin``/``xmax`` of ``S`` (``pg_current_snapshot()``), ``M = max(offset)``, the set ``W`` of
    transactions (virtual xids, from ``pg_locks``) holding a ROW EXCLUSIVE lock on the table or
    its partitions — every transaction inserting into it, or that has and has not ended — and the
    set ``X`` of transactions *of this database* holding an xid (``pg_stat_activity``,
    ``pg_prepared_xacts``; autovacuum workers, which never insert rows, are left out so an
    ANALYZE of a freshly loaded table does not hold the source back). ``(M, xmax, W, X)``
    becomes a pending candidate, resolved from the front once a later observation shows that

    * every transaction that had an xid at ``S`` has ended: ``xmin_now >= xmax`` (the cheap test)
      or none of ``X`` still holds its xid (so a long transaction in *another* database of the
      cluster, which cannot insert into this table, does not stall the source); and
    * none of ``W`` still holds its lock (every transaction inserting into the table at ``S`` has
      ended).

    Then ``safe_end = M + 1`` and reads return only ``offset < safe_end``. Why it is safe: any id
    ``k <= M`` was drawn from the sequence before ``M`` was, i.e. before ``S``, by a transaction
    that at ``S`` either held an xid or was inside its INSERT/COPY into this table (the table lock
    is taken before the id is drawn). Once both conditions hold it has ended, so its row is
    visible now or never will be. When no transaction of this database holds an xid and nobody
    holds a write lock on the table (``xmin == xmax`` is the special case), ``M + 1`` is safe at
    once.

    The lock check closes a gap an xid-only horizon leaves open: a transaction gets its xid only
    when it first writes a heap tuple, *after* its id is drawn — a slow ``BEFORE INSERT``
    trigger, ``COPY`` (which buffers rows before writing) or just the moment between ``nextval``
    and the heap insert let a later id commit while the earlier one's transaction has no xid yet
    (and ``xmin == xmax`` would wrongly declare everything final).

    **Residual caveat.** A transaction that drew a sequence value in an *earlier* statement
    (``SELECT nextval(...)``) while it had no xid, and inserts it explicitly later, is invisible
    to both checks until its INSERT starts; don't do that (nor client-side id blocks such as
    Hibernate's pooled optimizer). Long-running transactions that write to the table, or hold an
    xid in the same database, hold the horizon back until they end: latency, never loss. A new
    row therefore usually becomes readable one read after it commits on a busy database.

    Offsets jumping is detected: if the table's newest offset and its sequence are both below a
    committed ``start`` (the table was recreated or its sequence reset), :class:`SourceError`.
    A lost connection is re-established once per read and the read retried; if that fails too,
    the :class:`psycopg.OperationalError` propagates (a transient error to the runtime).
    """

    def __init__(self, source: TableSource, dsn: str) -> None:
        self.source = source
        self._dsn = dsn
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._safe_end = MIN_OFFSET
        self._pending: deque[_Candidate] = deque()
        self._last_max: int | None = None
        self._sequence: str | bool | None = False  # False: not looked up yet

        off = sql.Identifier(source.offset_column)
        table = source.table_ident
        self._off_ident = off
        self._drop_offset = False
        if source.columns is None:
            select_list: sql.Composable = sql.SQL("*")
        else:
            cols = list(source.columns)
            if source.offset_column not in cols:
                cols.append(source.offset_column)
                self._drop_offset = True
            select_list = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
        self._q_rows = sql.SQL(
            "SELECT {cols} FROM {table} WHERE {off} >= %s AND {off} < %s ORDER BY {off} LIMIT %s"
        ).format(cols=select_list, table=table, off=off)
        self._q_max = sql.SQL("SELECT max({off}) FROM {table}").format(off=off, table=table)
        self._q_horizon = sql.SQL(
            """
            WITH db AS (SELECT oid FROM pg_database WHERE datname = current_database()),
                 r AS (SELECT %(rel)s::regclass::oid AS oid)
            SELECT pg_snapshot_xmin(s)::text::bigint,
                   pg_snapshot_xmax(s)::text::bigint,
                   (SELECT max({off}) FROM {table}),
                   ARRAY(SELECT DISTINCT l.virtualtransaction FROM pg_locks l
                          WHERE l.locktype = 'relation'
                            AND l.mode = 'RowExclusiveLock'
                            AND l.database = (SELECT oid FROM db)
                            AND l.relation IN (
                                  SELECT oid FROM r
                                  UNION ALL
                                  SELECT relid
                                    FROM pg_partition_tree((SELECT oid FROM r)::regclass))
                            AND l.pid IS DISTINCT FROM pg_backend_pid()),
                   ARRAY(SELECT a.pid::text || ':' || a.backend_xid::text
                           FROM pg_stat_activity a
                          WHERE a.datid = (SELECT oid FROM db) AND a.backend_xid IS NOT NULL
                            AND a.pid <> pg_backend_pid()
                            AND a.backend_type <> 'autovacuum worker'
                         UNION ALL
                         SELECT 'prepared:' || p.transaction::text FROM pg_prepared_xacts p
                          WHERE p.database = current_database())
              FROM pg_current_snapshot() AS s
            """
        ).format(off=off, table=table)
        self._connect()

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        conn: psycopg.Connection[dict[str, Any]] = psycopg.connect(
            self._dsn, autocommit=True, row_factory=dict_row
        )
        try:
            cur = conn.cursor(row_factory=tuple_row)
            row = cur.execute(
                "SELECT to_regclass(%s)::oid", [self.source.regclass_text()]
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        if row is None or row[0] is None:
            conn.close()
            raise SourceError(
                f"source table {self.source.table!r} does not exist; fix: create it or correct "
                "the name given to TableSource"
            )
        self._conn = conn

    def _reconnect(self) -> None:
        old, self._conn = self._conn, None
        if old is not None:
            with contextlib.suppress(psycopg.Error):
                old.close()
        self._connect()

    def close(self) -> None:
        """Close the reader's connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _with_retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; on a lost connection reconnect once and run it again."""
        try:
            return self._call(fn)
        except psycopg.OperationalError:
            log.warning("%s: connection lost, reconnecting", self.source.describe(), exc_info=True)
            self._reconnect()
            return self._call(fn)

    def _call(self, fn: Callable[[], T]) -> T:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._reconnect()
        try:
            return fn()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise SourceError(
                f"{self.source.describe()} can no longer be read: {str(exc).strip()}; "
                "fix: restore the table/column or correct the TableSource definition"
            ) from exc

    # -- PartitionReader -----------------------------------------------------------------------

    def read(self, start: int, max_records: int) -> ReadResult:
        """Up to ``max_records`` rows with ``start <= offset < safe_end``, in offset order."""
        return self._with_retry(lambda: self._read(start, max_records))

    def head(self) -> int | None:
        """``max(offset) + 1`` of the table now, or ``None`` when it is empty."""
        top = self._with_retry(self._max)
        return None if top is None else top + 1

    # -- internals -----------------------------------------------------------------------------

    def _max(self) -> int | None:
        assert self._conn is not None
        row = self._conn.cursor(row_factory=tuple_row).execute(self._q_max).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _read(self, start: int, max_records: int) -> ReadResult:
        records: list[SourceRecord] = []
        if max_records <= 0:
            return ReadResult(records, start, self._head_hint())
        if start < self._safe_end:
            records = self._fetch(start, self._safe_end, max_records)
            if len(records) >= max_records:  # catching up: no need to move the horizon
                return ReadResult(records, records[-1].offset + 1, self._head_hint())
        self._advance_horizon()
        nxt = records[-1].offset + 1 if records else start
        if nxt < self._safe_end:
            records += self._fetch(nxt, self._safe_end, max_records - len(records))
        if records:
            return ReadResult(records, records[-1].offset + 1, self._head_hint())
        if start > MIN_OFFSET and (self._last_max is None or self._last_max + 1 < start):
            self._check_not_reset(start)
        return ReadResult(records, start, self._head_hint())

    def _head_hint(self) -> int | None:
        return None if self._last_max is None else self._last_max + 1

    def _fetch(self, lo: int, hi: int, limit: int) -> list[SourceRecord]:
        assert self._conn is not None
        rows = self._conn.execute(self._q_rows, [lo, hi, limit]).fetchall()
        off = self.source.offset_column
        if self._drop_offset:
            return [SourceRecord(row.pop(off), row) for row in rows]
        return [SourceRecord(row[off], row) for row in rows]

    def _advance_horizon(self) -> None:
        """Observe the snapshot, max(offset) and the writers; move ``safe_end`` if possible."""
        assert self._conn is not None
        cur = self._conn.cursor(row_factory=tuple_row)
        row = cur.execute(self._q_horizon, {"rel": self.source.regclass_text()}).fetchone()
        assert row is not None
        xmin, xmax, top, writers_list, xids_list = row
        writers = frozenset(writers_list)
        xids = frozenset(xids_list)
        self._last_max = top
        pending = self._pending
        while pending:
            c = pending[0]
            xid_holders_done = xmin >= c.xmax or not (c.xids & xids)
            if not (xid_holders_done and not (c.writers & writers)):
                break
            self._safe_end = max(self._safe_end, c.top + 1)
            pending.popleft()
        if top is None:
            return
        if (xmin == xmax or not xids) and not writers:
            # no transaction of this database holds an xid and nobody is writing the table:
            # every row up to max is final
            self._safe_end = max(self._safe_end, top + 1)
            pending.clear()
            return
        newest = pending[-1].top + 1 if pending else self._safe_end
        if top + 1 > newest:
            pending.append(_Candidate(top, xmax, writers, xids))

    def _check_not_reset(self, start: int) -> None:
        """Fail loudly if ``start`` is past everything the table's sequence ever handed out."""
        assert self._conn is not None
        cur = self._conn.cursor(row_factory=tuple_row)
        if self._sequence is False:
            row = cur.execute(
                "SELECT pg_get_serial_sequence(%s, %s)",
                [self.source.regclass_text(), self.source.offset_column],
            ).fetchone()
            self._sequence = row[0] if row else None
        if not isinstance(self._sequence, str):
            return
        try:
            row = cur.execute(
                "SELECT pg_sequence_last_value(%s::regclass)", [self._sequence]
            ).fetchone()
        except psycopg.OperationalError:
            raise
        except psycopg.Error:
            return  # no privilege on the sequence: cannot tell, don't guess
        last = row[0] if row else None
        if last is None or last < start - 1:
            raise SourceError(
                f"offsets jumped in {self.source.describe()}: the committed offset {start} is "
                f"past the table's newest offset ({self._last_max}) and past the last value "
                f"handed out by its sequence {self._sequence} ({last}); the table or its "
                "sequence was recreated or reset, so reading on would skip rows. fix: reset this "
                "job's offset for the source (or restore the sequence: "
                f"SELECT setval('{self._sequence}', {start - 1}))"
            )

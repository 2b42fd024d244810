"""A PostgreSQL table as a source ordered by an increasing integer column: one partition, or
``partitions=N`` partitions split by a hash of a column, each with its own offset.

The hard part is invariant 6 (never skip a row that becomes visible later). Values of a
``bigserial``/identity column are handed out *before* the inserting transaction commits, so
the row with id 6 can become visible before the row with id 5. A reader that simply resumed
after the largest id it has seen would skip 5 forever. :class:`TableReader` therefore only reads
below a *safe horizon*, an offset below which no row can still appear; see its docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import pq, sql
from psycopg.rows import tuple_row

from pgstream.db.names import case_hint, display_name, parse_table_name
from pgstream.errors import ConfigError
from pgstream.gcpause import gc_paused
from pgstream.sources.base import (
    OpenContext,
    PartitionReader,
    ReadResult,
    Source,
    SourceError,
    SourceRecord,
    TableRead,
)
from pgstream.sources.raw import TableRows

__all__ = ["HorizonHolder", "ReadSpan", "TableReader", "TableSource", "parse_table_name"]

log = logging.getLogger(__name__)

MIN_OFFSET = -(2**63)
T = TypeVar("T")
_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})
#: a split table's partition with no rows of its own in this many final offsets moves past
#: them (an empty batch) instead of scanning them again at every read
SPLIT_SKIP_SPAN = 10_000
#: spellings of a TimeZone setting that is UTC (the reader's session then says ``UTC``)
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "UCT", "Etc/UCT", "GMT", "Etc/GMT", "Universal",
                        "Etc/Universal", "Zulu", "Etc/Zulu", "Etc/GMT0", "GMT0", "Greenwich",
                        "Etc/Greenwich", "Etc/GMT+0", "Etc/GMT-0", "GMT+0", "GMT-0"})  # fmt: skip
#: column types whose text form depends only on the value (not on session settings such as
#: TimeZone or DateStyle), so the hash that splits a table is the same in every session
_PARTITION_BY_TYPES = _INTEGER_TYPES | frozenset(
    {"text", "character varying", "character", "uuid", "numeric", "boolean"}
)


class TableSource(Source):
    """Rows of a table in order of an increasing integer ``offset_column`` (one partition "0").

    Records are the rows as dicts (only ``columns`` if given); a record's offset is its
    ``offset_column`` value and the initial offset is ``-2**63`` (read everything).

    ``table`` is resolved like PostgreSQL resolves a name in SQL (:mod:`pgstream.db.names`):
    unquoted parts fold to lower case, double-quoted parts keep their case
    (``TableSource('public."Order Lines"')``).

    Preconditions for exactly-once reading (see :class:`TableReader` for why), checked by
    :meth:`validate` at start:

    * the offset column is filled at insert time from a sequence or identity column (``bigserial``,
      ``GENERATED ... AS IDENTITY``, ``DEFAULT nextval(...)``) that only increases, with
      ``CACHE 1`` (the default);
    * rows are inserted through this table (for a partitioned table, through the parent or its
      partitions), and the table is append-only from the job's point of view (updates and deletes
      of already-read rows are not seen);
    * the offset column is indexed (btree), so every read is an index range scan.

    ``unsafe_offsets_may_skip_rows=True`` accepts an offset column that no sequence fills (the
    application writes the values). The safe horizon cannot protect such a column: a row
    committed after a row with a larger offset was read is skipped for good. Use it only when
    one writer commits rows in increasing offset order; a warning is logged at start.

    ``partitions=N, partition_by="col"`` splits the table into ``N`` partitions named
    ``"0"`` .. ``"N-1"``: a row belongs to partition
    ``abs(mod(hashtextextended(coalesce(col::text, ''), 0), N))`` (PostgreSQL's own stable
    text hash, the same on every server and platform; a NULL hashes like ``''``), so every
    row of one ``col`` value is in one partition, in offset order. Each partition has its own
    offset and
    reads only below the table's safe horizon, like one partition does; the workers of a job
    share them. ``col`` must be an integer, text, uuid, numeric or boolean column. Changing
    ``N`` or ``col`` changes what the offsets mean, so the job refuses to resume the stream
    (start it over with ``pgstream job reset``). A partition's read scans the offset index past
    the other partitions' rows; keep ``N`` small (a few per core of the group).
    """

    kind = "table"

    def __init__(
        self,
        table: str,
        *,
        offset_column: str = "id",
        columns: Sequence[str] | None = None,
        unsafe_offsets_may_skip_rows: bool = False,
        partitions: int = 1,
        partition_by: str | None = None,
    ) -> None:
        if not offset_column:
            raise ConfigError("TableSource needs an offset_column name")
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"TableSource({table!r}): partitions must be an int >= 1, got "
                              f"{partitions!r}")
        if partitions > 1 and not partition_by:
            raise ConfigError(
                f"TableSource({table!r}, partitions={partitions}) needs partition_by= naming the "
                "column whose hash splits the rows (e.g. partition_by=\"user_id\")"
            )
        if partitions == 1 and partition_by is not None:
            raise ConfigError(
                f"TableSource({table!r}): partition_by={partition_by!r} needs partitions > 1"
            )
        self.n_partitions = partitions
        self.partition_by = partition_by
        self.table = table
        self.schema, self.relname = parse_table_name(table)
        self.offset_column = offset_column
        self.columns: tuple[str, ...] | None = tuple(columns) if columns is not None else None
        if self.columns is not None and not self.columns:
            raise ConfigError(f"TableSource({table!r}) got an empty columns list")
        self.unsafe_offsets_may_skip_rows = unsafe_offsets_may_skip_rows
        #: the table's columns in their order, as :meth:`validate` last saw them (None before)
        self.column_names: tuple[str, ...] | None = None

    # -- SQL building blocks -----------------------------------------------------------------

    @property
    def table_ident(self) -> sql.Identifier:
        """The table as a (possibly schema-qualified) SQL identifier."""
        if self.schema is None:
            return sql.Identifier(self.relname)
        return sql.Identifier(self.schema, self.relname)

    def regclass_text(self) -> str:
        """The table name quoted for ``::regclass`` / ``to_regclass`` (no connection needed)."""
        return self.tables_read()[0].regclass_text()

    def tables_read(self) -> list[TableRead]:
        """This table, read by its offset column."""
        return [TableRead(self.schema, self.relname, self.offset_column)]

    # -- Source --------------------------------------------------------------------------------

    def single_partition(self) -> bool:
        """One partition unless split with ``partitions=N``."""
        return self.n_partitions == 1

    def partition_key(self) -> str | None:
        """``partition_by``: every row with one value of it lands in one partition."""
        return self.partition_by

    def identity(self) -> str:
        """``table <schema>.<table> offset <column>``; an unqualified name counts as ``public``.
        A split table adds `` partitions <N> by <column>``."""
        ident = f"table {self.schema or 'public'}.{self.relname} offset {self.offset_column}"
        if self.n_partitions > 1:
            ident += f" partitions {self.n_partitions} by {self.partition_by}"
        return ident

    def partitions(self, conn: psycopg.Connection[Any]) -> Sequence[str]:
        """``"0"`` .. ``"N-1"`` (one partition, ``"0"``, by default)."""
        return [str(i) for i in range(self.n_partitions)]

    def partition_filter(self, partition: str) -> sql.Composable | None:
        """The SQL condition selecting ``partition``'s rows (None: one partition, all rows)."""
        if self.n_partitions == 1:
            return None
        assert self.partition_by is not None
        return sql.SQL(
            "abs(mod(hashtextextended(coalesce({col}::text, ''), 0), {n})) = {p}"
        ).format(
            col=sql.Identifier(self.partition_by),
            n=sql.Literal(self.n_partitions),
            p=sql.Literal(int(partition)),
        )

    def initial_offset(self, partition: str) -> int:
        """``-2**63``: start before every possible offset."""
        return MIN_OFFSET

    def open(self, partition: str, context: OpenContext) -> TableReader:
        """Open a reader with its own autocommit connection to the job's database; it reads
        only the columns of ``context.fields`` when known (see :meth:`select_columns`)."""
        if partition not in {str(i) for i in range(self.n_partitions)}:
            raise SourceError(
                f"{self.describe()} has partitions 0..{self.n_partitions - 1}, not {partition!r}"
            )
        return TableReader(self, context.dsn, partition, self.select_columns(context.fields))

    def select_columns(self, fields: frozenset[str] | None) -> tuple[str, ...] | None:
        """The columns a reader selects, ``None`` for all (``SELECT *``): ``columns`` when
        given, else the table's columns the pipeline reads (``fields``, when the pipeline
        can say: no Python function sees the records) once :meth:`validate` has seen them.
        A field that is no column is left out, so reading it fails record by record as it
        would with every column read."""
        if self.columns is not None:
            return self.columns
        if fields is None or self.column_names is None:
            return None
        return tuple(c for c in self.column_names if c in fields)

    def describe(self) -> str:
        """``table <schema.table>``."""
        return f"table {self.table}"

    def horizon_holders(self, dsn: str, min_age: float = 0.0) -> list[HorizonHolder]:
        """The sessions holding this source's safe horizon back now (see
        :meth:`TableReader.horizon_holders`), over a short-lived connection to ``dsn``."""
        reader = TableReader(self, dsn)
        try:
            return reader.horizon_holders(min_age)
        finally:
            reader.close()

    def __repr__(self) -> str:
        unsafe = ", unsafe_offsets_may_skip_rows=True" if self.unsafe_offsets_may_skip_rows else ""
        if self.n_partitions > 1:
            unsafe += f", partitions={self.n_partitions}, partition_by={self.partition_by!r}"
        return f"TableSource({self.table!r}, offset_column={self.offset_column!r}{unsafe})"

    def validate(self, conn: psycopg.Connection[Any]) -> None:
        """Check the table, the offset column (an integer) and ``columns`` exist.

        Also refuses an offset column that no sequence or identity fills (unless
        ``unsafe_offsets_may_skip_rows``) and a sequence with ``CACHE`` > 1 (values would not be
        handed out in commit-compatible order across sessions), and logs a warning when the
        offset column has no btree index. Runs only catalog queries that cannot fail, so it is
        safe inside the caller's transaction.
        """
        cur = conn.cursor(row_factory=tuple_row)
        relid = self._relid(conn, cur)
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
        self._check_columns(types)
        self.column_names = tuple(name for name, _, _ in sorted(cols, key=lambda c: c[1]))
        self._check_index(conn, cur, relid, attnums[self.offset_column])
        self._check_sequence(cur, relid, attnums[self.offset_column])

    def _relid(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[tuple[Any, ...]]) -> int:
        """The table's oid, or :class:`SourceError` saying where it was looked for."""
        row = cur.execute("SELECT to_regclass(%s)::oid", [self.regclass_text()]).fetchone()
        relid = row[0] if row else None
        if relid is not None:
            return int(relid)
        where = (
            f"schema {self.schema!r}"
            if self.schema is not None
            else "the search_path ("
            + str(_scalar(cur, "SELECT current_setting('search_path')"))
            + ")"
        )
        raise SourceError(
            f"source table {self.table!r} does not exist (looked for "
            f"{display_name(None, self.relname)} in {where}); " + self._missing_fix(conn)
        )

    def _missing_fix(self, conn: psycopg.Connection[Any]) -> str:
        """The fix for a missing table: its quoted spelling when only its case differs."""
        hint = case_hint(conn, self.schema, self.relname)
        if hint is not None:
            return f"fix: {hint}"
        return "fix: create it (e.g. in your migrations) or correct the name given to TableSource"

    def _check_columns(self, types: dict[str, str]) -> None:
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
        pb = self.partition_by
        if pb is not None and pb not in types:
            raise SourceError(
                f"source table {self.table!r} has no partition_by column {pb!r}; "
                "fix: correct the partition_by= given to TableSource"
            )
        if pb is not None and types[pb] not in _PARTITION_BY_TYPES:
            raise SourceError(
                f"partition_by column {pb!r} of source table {self.table!r} has type "
                f"{types[pb]}, whose text form may depend on session settings; fix: split by "
                "an integer, text, uuid, numeric or boolean column"
            )
        if self.columns is not None:
            missing = [c for c in self.columns if c not in types]
            if missing:
                raise SourceError(
                    f"source table {self.table!r} has no column(s) "
                    f"{', '.join(map(repr, missing))}; "
                    "fix: correct the columns= given to TableSource"
                )

    def _check_index(
        self,
        conn: psycopg.Connection[Any],
        cur: psycopg.Cursor[tuple[Any, ...]],
        relid: int,
        attnum: int,
    ) -> None:
        indexed = _scalar(
            cur,
            """
            SELECT EXISTS (
              SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                JOIN pg_am am ON am.oid = c.relam
               WHERE i.indrelid = %s AND i.indkey[0] = %s AND am.amname = 'btree'
                 AND i.indisvalid AND i.indpred IS NULL)
            """,
            [relid, attnum],
        )
        if not indexed:
            log.warning(
                "offset column %r of source table %r has no btree index: every read will scan the "
                "table; fix: CREATE INDEX ON %s (%s)",
                self.offset_column,
                self.table,
                self.regclass_text(),
                sql.Identifier(self.offset_column).as_string(conn),
            )

    def _check_sequence(
        self, cur: psycopg.Cursor[tuple[Any, ...]], relid: int, attnum: int
    ) -> None:
        """Refuse an offset column no sequence fills, or a sequence with ``CACHE`` > 1."""
        off = self.offset_column
        seq = _scalar(
            cur,
            """
            SELECT COALESCE(
              pg_get_serial_sequence(%(rel)s, %(col)s),
              (SELECT d.refobjid::regclass::text
                 FROM pg_attrdef ad
                 JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                                 AND d.refclassid = 'pg_class'::regclass
                 JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
                WHERE ad.adrelid = %(relid)s AND ad.adnum = %(attnum)s
                LIMIT 1))
            """,
            {"rel": self.regclass_text(), "col": off, "relid": relid, "attnum": attnum},
        )
        if seq is None:
            if not self.unsafe_offsets_may_skip_rows:
                raise SourceError(
                    f"offset column {off!r} of source table {self.table!r} is not filled by a "
                    "sequence or identity (the application writes its values): a row committed "
                    "after a row with a larger offset was read would be skipped for good; fix: "
                    "make it bigserial / GENERATED ALWAYS AS IDENTITY (or DEFAULT nextval(...) "
                    "of a CACHE 1 sequence), or accept the risk with "
                    "TableSource(..., unsafe_offsets_may_skip_rows=True)"
                )
            log.warning(
                "offset column %r of source table %r is not filled by a sequence or identity; "
                "reading it anyway (unsafe_offsets_may_skip_rows=True): a row committed after a "
                "row with a larger offset was read is skipped for good",
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


def _scalar(
    cur: psycopg.Cursor[tuple[Any, ...]],
    query: str,
    params: Sequence[Any] | Mapping[str, Any] = (),
) -> Any:
    row = cur.execute(query, params).fetchone()
    return row[0] if row else None


# The two sets the safe horizon waits for (see TableReader), shared by the horizon query and
# the query that names the sessions holding it back. Both need the CTEs ``db`` and ``r``.
_HORIZON_CTES = """
            WITH db AS (SELECT oid FROM pg_database WHERE datname = current_database()),
                 r AS (SELECT %(rel)s::regclass::oid AS oid)"""
# W: transactions holding a ROW EXCLUSIVE lock on the table or one of its partitions
_WRITER_LOCKS = """FROM pg_locks l
                          WHERE l.locktype = 'relation'
                            AND l.mode = 'RowExclusiveLock'
                            AND l.database = (SELECT oid FROM db)
                            AND l.relation IN (
                                  SELECT oid FROM r
                                  UNION ALL
                                  SELECT relid
                                    FROM pg_partition_tree((SELECT oid FROM r)::regclass))
                            AND l.pid IS DISTINCT FROM pg_backend_pid()"""
# X: sessions of this database holding an xid (autovacuum never inserts rows)
_XID_SESSIONS = """FROM pg_stat_activity a
                          WHERE a.datid = (SELECT oid FROM db) AND a.backend_xid IS NOT NULL
                            AND a.pid <> pg_backend_pid()
                            AND a.backend_type IS DISTINCT FROM 'autovacuum worker'"""
_HOLDERS = (
    _HORIZON_CTES
    + """,
                 w AS (SELECT DISTINCT l.pid """
    + _WRITER_LOCKS
    + """),
                 x AS (SELECT a.pid """
    + _XID_SESSIONS
    + """)
            SELECT a.pid, a.application_name, a.state,
                   extract(epoch FROM now() - a.xact_start)::float8 AS age,
                   a.query, a.pid IN (SELECT pid FROM w), a.pid IN (SELECT pid FROM x)
              FROM pg_stat_activity a
             WHERE a.pid IN (SELECT pid FROM w UNION SELECT pid FROM x)
               AND COALESCE(now() - a.xact_start >= make_interval(secs => %(min_age)s), true)
            UNION ALL
            SELECT NULL, 'prepared transaction ' || p.gid, 'prepared',
                   extract(epoch FROM now() - p.prepared)::float8, NULL, false, true
              FROM pg_prepared_xacts p
             WHERE p.database = current_database()
               AND now() - p.prepared >= make_interval(secs => %(min_age)s)
             ORDER BY 4 DESC NULLS LAST, 1
            """
)


@dataclass(slots=True, frozen=True)
class HorizonHolder:
    """A session whose open transaction keeps a :class:`TableSource` from reading on.

    ``writes_table``: it holds a write lock on the table (it inserted, or is inserting);
    ``holds_xid``: it holds a transaction id in this database (it wrote something and has not
    ended; it may still commit an id it drew earlier). ``pid`` is ``None`` for a prepared
    transaction; ``query`` is the first line of its last statement, ``None`` when the role
    may not see it.
    """

    pid: int | None
    application_name: str
    state: str | None
    xact_age_seconds: float | None
    query: str | None
    writes_table: bool
    holds_xid: bool

    def describe(self) -> str:
        """``pid 4242 (psql), idle in transaction, transaction open 63s: INSERT ...``."""
        if self.pid is None:
            who = self.application_name  # "prepared transaction <gid>"
        else:
            who = f"pid {self.pid}"
            if self.application_name:
                who += f" ({self.application_name})"
        parts = [who]
        if self.state:
            parts.append(self.state)
        if self.xact_age_seconds is not None:
            parts.append(f"transaction open {self.xact_age_seconds:.0f}s")
        parts.append("writes the table" if self.writes_table else "holds a transaction id")
        text = ", ".join(parts)
        return f"{text}: {self.query}" if self.query else text

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``HorizonHolder(**d)`` rebuilds it)."""
        return dataclasses.asdict(self)


def _first_line(query: str | None) -> str | None:
    if not query or query == "<insufficient privilege>":
        return None
    for line in query.strip().splitlines():
        if line.strip():
            return line.strip()[:200]
    return None


@dataclass(slots=True, frozen=True)
class ReadSpan:
    """A batch's offsets ``[start, end)`` and its number of rows, not read
    (:meth:`TableReader.read_span`)."""

    end: int
    records: int
    head: int | None


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

    def __init__(
        self,
        source: TableSource,
        dsn: str,
        partition: str = "0",
        columns: Sequence[str] | None = None,
    ) -> None:
        self.source = source
        self.partition = partition
        self._dsn = dsn
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        #: rows come in the binary format while every column type has a binary loader
        #: (decided from each result's columns: same values, parsed faster)
        self._binary: bool | None = None
        #: the (name, type) of every column of the last result
        self._shape: tuple[tuple[str, int], ...] | None = None
        self._safe_end = MIN_OFFSET
        self._pending: deque[_Candidate] = deque()
        self._last_max: int | None = None
        self._sequence: str | bool | None = False  # False: not looked up yet
        self._q_span: sql.Composed | None = None

        off = sql.Identifier(source.offset_column)
        table = source.table_ident
        self._off_ident = off
        #: the records' field names (None: the result's column names, ``SELECT *``) and
        #: where the offset is in a row (None: found from the result's column names)
        self._names: tuple[str, ...] | None = None
        self._offset_index: int | None = None
        self._select_all = columns is None
        if columns is None:
            select_list: sql.Composable = sql.SQL("*")
        else:
            cols = list(columns)
            self._names = tuple(cols)
            if source.offset_column not in cols:
                cols.append(source.offset_column)  # last: no field of the records
            self._offset_index = cols.index(source.offset_column)
            select_list = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
        where = source.partition_filter(partition)
        mine: sql.Composable = sql.SQL("") if where is None else sql.SQL(" AND ") + where
        self._split = where is not None
        self._q_rows = sql.SQL(
            "SELECT {cols} FROM {table} WHERE {off} >= %s AND {off} < %s{mine} "
            "ORDER BY {off} LIMIT %s"
        ).format(cols=select_list, table=table, off=off, mine=mine)
        self._q_max = sql.SQL("SELECT max({off}) FROM {table}{where}").format(
            off=off, table=table, where=sql.SQL("") if where is None else sql.SQL(" WHERE ") + where
        )
        self._q_horizon = sql.SQL(
            _HORIZON_CTES
            + """
            SELECT pg_snapshot_xmin(s)::text::bigint,
                   pg_snapshot_xmax(s)::text::bigint,
                   (SELECT max({off}) FROM {table}),
                   ARRAY(SELECT DISTINCT l.virtualtransaction """
            + _WRITER_LOCKS
            + """),
                   ARRAY(SELECT a.pid::text || ':' || a.backend_xid::text """
            + _XID_SESSIONS
            + """
                         UNION ALL
                         SELECT 'prepared:' || p.transaction::text FROM pg_prepared_xacts p
                          WHERE p.database = current_database())
              FROM pg_current_snapshot() AS s
            """
        ).format(off=off, table=table)
        self._connect()

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(
            self._dsn, autocommit=True, row_factory=tuple_row
        )
        try:
            cur = conn.cursor()
            if conn.info.parameter_status("TimeZone") in _UTC_NAMES:
                # the same instants and offsets; psycopg loads timestamptz values much faster
                # in a session whose TimeZone is spelt "UTC" (tzinfo=datetime.timezone.utc)
                cur.execute("SET TimeZone = 'UTC'")
            row = cur.execute(
                "SELECT to_regclass(%s)::oid", [self.source.regclass_text()]
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        if row is None or row[0] is None:
            try:
                fix = self.source._missing_fix(conn)
            finally:
                conn.close()
            raise SourceError(f"source table {self.source.table!r} does not exist; {fix}")
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
        rows = self.read_raw(start, max_records)
        return ReadResult(rows.records(), rows.end, rows.head)

    def head(self) -> int | None:
        """``max(offset) + 1`` of the table (of this partition's rows, for a split table) now,
        or ``None`` when it has none."""
        top = self._with_retry(self._max)
        return None if top is None else top + 1

    def horizon_holders(self, min_age: float = 0.0) -> list[HorizonHolder]:
        """The sessions whose open transactions hold the safe horizon back now: those that
        write the table and those holding a transaction id in this database (the sets the
        horizon waits for), oldest transaction first; only transactions open ``min_age``
        seconds or more."""
        return self._with_retry(lambda: self._holders(min_age))

    def _holders(self, min_age: float) -> list[HorizonHolder]:
        assert self._conn is not None
        cur = self._conn.cursor(row_factory=tuple_row)
        rows = cur.execute(
            _HOLDERS, {"rel": self.source.regclass_text(), "min_age": float(min_age)}
        ).fetchall()
        return [
            HorizonHolder(pid, app or "", state, age, _first_line(query), bool(w), bool(x))
            for pid, app, state, age, query, w, x in rows
        ]

    # -- internals -----------------------------------------------------------------------------

    def _max(self) -> int | None:
        assert self._conn is not None
        row = self._conn.cursor(row_factory=tuple_row).execute(self._q_max).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def read_raw(self, start: int, max_records: int) -> TableRows:
        """Like :meth:`read`, the rows as tuples (:class:`~pgstream.sources.raw.TableRows`):
        the runtime builds a dict per row only where a Python function needs one."""
        return self._with_retry(lambda: self._read(start, max_records))

    def _read(self, start: int, max_records: int) -> TableRows:
        rows: list[tuple[Any, ...]] = []
        if max_records <= 0:
            return self._rows(rows, start, start)
        if start < self._safe_end:
            rows = self._fetch(start, self._safe_end, max_records)
            if len(rows) >= max_records:  # catching up: no need to move the horizon
                return self._rows(rows, start, rows[-1][self._off] + 1)
        self._advance_horizon()
        nxt = rows[-1][self._off] + 1 if rows else start
        if nxt < self._safe_end:
            layout = (self._names, self._offset_index)
            more = self._fetch(nxt, self._safe_end, max_records - len(rows))
            if rows and (self._names, self._offset_index) != layout:
                # the table's columns changed between the two fetches: these rows have the
                # old layout; the next read returns the others
                return self._rows(rows, start, rows[-1][self._off] + 1, layout)
            rows += more
        if rows:
            end = rows[-1][self._off] + 1
            if self._split and len(rows) < max_records:
                end = max(end, self._safe_end)  # every row of this partition below it was read
            return self._rows(rows, start, end)
        if self._split and self._safe_end - start >= SPLIT_SKIP_SPAN:
            # none of this partition's rows in a long final range: move past it, so the next
            # read does not walk the other partitions' rows again
            return self._rows(rows, start, self._safe_end)
        if start > MIN_OFFSET and (self._last_max is None or self._last_max + 1 < start):
            self._check_not_reset(start)
        return self._rows(rows, start, start)

    @property
    def _off(self) -> int:
        assert self._offset_index is not None
        return self._offset_index

    def _rows(
        self,
        rows: list[tuple[Any, ...]],
        start: int,
        end: int,
        layout: tuple[tuple[str, ...] | None, int | None] | None = None,
    ) -> TableRows:
        names, offset_index = layout or (self._names, self._offset_index)
        return TableRows(names or (), rows, offset_index or 0, start, end, self._head_hint())

    def _head_hint(self) -> int | None:
        # a split table's newest offset is the table's, not this partition's: unknown here
        return None if self._last_max is None or self._split else self._last_max + 1

    def safe_end(self) -> int:
        """The offset below which every row is final as far as this reader has seen: no
        transaction can still add a row there (the safe horizon; it only moves forward)."""
        return self._safe_end

    def read_range(self, start: int, end: int, limit: int) -> list[SourceRecord]:
        """Up to ``limit`` rows with ``start <= offset < end``, in offset order, read as they
        are now without waiting for the safe horizon: for a range known to be final already
        (below a committed offset, which was below the horizon when it was committed).
        Database errors propagate as they are (no reconnect)."""
        rows = self._fetch(start, end, limit)
        return self._rows(rows, start, end).records()

    def _fetch(self, lo: int, hi: int, limit: int) -> list[tuple[Any, ...]]:
        """The rows with ``lo <= offset < hi`` (at most ``limit``), as tuples (loaded with
        the cyclic garbage collector paused: a page of rows is tens of thousands of new
        tuples, and their values hold no reference cycles)."""
        assert self._conn is not None
        binary = bool(self._binary)
        cur = self._conn.cursor(binary=binary)
        cur.execute(self._q_rows, [lo, hi, limit])
        with gc_paused():
            rows = cur.fetchall()
        if self._learn(cur) and binary and not self._binary:
            # the table changed under a binary read: a column now has a type only its text
            # form loads (it would have come as bytes), so read these rows again as text
            cur = self._conn.cursor()
            cur.execute(self._q_rows, [lo, hi, limit])
            with gc_paused():
                rows = cur.fetchall()
        return rows

    def _learn(self, cur: psycopg.Cursor[tuple[Any, ...]]) -> bool:
        """From a result's columns, when they differ from the last result's (the first read,
        or the table was altered): the field names of ``SELECT *`` and whether every column's
        type loads from the binary format (else its text form is kept: an unknown type
        arrives as text, as it always did). True when they differed."""
        desc = cur.description or []
        shape = tuple((d.name, d.type_code) for d in desc)
        if shape == self._shape:
            return False
        self._shape = shape
        if self._select_all:
            self._names = tuple(name for name, _ in shape)
            self._offset_index = self._names.index(self.source.offset_column)
        loaders = cur.adapters
        self._binary = all(
            loaders.get_loader(oid, pq.Format.BINARY) is not None for _, oid in shape
        )
        return True

    def read_span(self, start: int, max_records: int) -> ReadSpan:
        """Like :meth:`read`, without fetching the rows: where a batch of up to
        ``max_records`` rows from ``start`` below the safe horizon ends, and how many rows it
        holds (for sink paths pushed down into SQL, which read the rows themselves)."""
        return self._with_retry(lambda: self._span(start, max_records))

    def _span(self, start: int, limit: int) -> ReadSpan:
        if self._q_span is None:
            where = self.source.partition_filter(self.partition)
            mine: sql.Composable = sql.SQL("") if where is None else sql.SQL(" AND ") + where
            self._q_span = sql.SQL(
                "SELECT count(*), max({off}) FROM (SELECT {off} FROM {table} "
                "WHERE {off} >= %s AND {off} < %s{mine} ORDER BY {off} LIMIT %s) AS s"
            ).format(off=self._off_ident, table=self.source.table_ident, mine=mine)
        count, top = self._count(start, limit)
        if count < limit:
            self._advance_horizon()
            count, top = self._count(start, limit)
        if count:
            end = top + 1
            if self._split and count < limit:
                end = max(end, self._safe_end)  # every row of this partition below it counted
            return ReadSpan(end, count, self._head_hint())
        if self._split and self._safe_end - start >= SPLIT_SKIP_SPAN:
            return ReadSpan(self._safe_end, 0, self._head_hint())
        if start > MIN_OFFSET and (self._last_max is None or self._last_max + 1 < start):
            self._check_not_reset(start)
        return ReadSpan(start, 0, self._head_hint())

    def _count(self, start: int, limit: int) -> tuple[int, int]:
        if start >= self._safe_end or limit <= 0:
            return 0, start
        assert self._conn is not None and self._q_span is not None
        cur = self._conn.cursor(row_factory=tuple_row)
        row = cur.execute(self._q_span, [start, self._safe_end, limit]).fetchone()
        assert row is not None
        return int(row[0]), (start if row[1] is None else int(row[1]))

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
                "sequence was recreated or reset, so reading on would skip rows. fix: pgstream job "
                "reset MODULE:APP --stream S --delete-outputs (or restore the sequence: "
                f"SELECT setval('{self._sequence}', {start - 1}))"
            )

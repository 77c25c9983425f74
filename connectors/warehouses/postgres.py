"""PostgreSQL warehouse (psycopg 3): binary COPY into staging, one merge transaction per
(batch, partition), safe with the warehouse role on every worker at once.

Staging: a regular UNLOGGED table keyed by (partition, stamps of the chunk), one COPY per
chunk, rather than chunks buffered in the sink and copied inside the merge transaction.
Why: memory stays bounded by --chunk-rows (buffering would hold every open batch of a
partition until its end marker, millions of rows for a large replace), and each call is a
self-contained transaction on whichever pooled connection it gets, so it works behind a
pool or PgBouncer in transaction mode (no TEMP table lives across calls). UNLOGGED: staging
needs no durability (the change sink re-reads an open batch from its start after a crash,
and an UNLOGGED table is emptied by a server crash, which is the same thing), and skipping
the write-ahead log makes COPY cheaper. A chunk's stamps are deterministic, so a chunk staged
again (by this worker or by the next owner of the partition) replaces its own rows.

Concurrency: merges of different partitions touch disjoint members (records are keyed by
user, so one user lives in one partition) and run at once on different workers; merges of
one partition take a transaction-level advisory lock on it, and the load ledger's primary
key stays the once-only guard (a unique violation there is retried, and the retry finds
the ledger row).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pyarrow as pa
from psycopg import sql as pgsql
from psycopg_pool import ConnectionPool

from connectors.change_set import ChangeSet
from connectors.warehouses.base import (
    KEY_OF_BIGINT,
    LEDGER_ALL,
    SEGMENT_TABLES,
    STATUS_COLUMNS,
    TIMESTAMP_COLUMNS,
    LedgerRow,
    LoadResult,
    Tx,
    chunk_bounds,
    merge_once,
    narrow_position_columns,
    rows_to_stage,
    status_table,
    with_retries,
)
from streams.faults import crash_point
from topics import positions

T = TypeVar("T")

# SQLSTATEs worth a retry: serialization_failure, deadlock_detected, and the connection
# ones (class 08, and the server going away: admin_shutdown, crash_shutdown,
# cannot_connect_now). unique_violation only where it is the ledger race (see merge).
RETRY_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})
UNIQUE_VIOLATION = "23505"
# First key of the advisory locks this warehouse takes (the second is the partition).
LOCK_SPACE = 0x5E6D  # "segm"

SCHEMA = (
    # One row per (segment_id, user_id): the primary key the merge's ON CONFLICT uses.
    # COLLATE "C": ids compare bytewise (as DuckDB sorts them), and the key's index and the
    # merge's sort skip the locale's rules, which cost several times the comparison.
    """
    CREATE TABLE IF NOT EXISTS segment_members (
        segment_id TEXT COLLATE "C" NOT NULL,
        user_id TEXT COLLATE "C" NOT NULL,
        batch_id TEXT NOT NULL,
        updated_seq BIGINT NOT NULL,
        PRIMARY KEY (segment_id, user_id)
    )
    """,
    """
    CREATE UNLOGGED TABLE IF NOT EXISTS staged_changes (
        partition INTEGER NOT NULL,
        source_position TEXT COLLATE "C" NOT NULL,
        part INTEGER NOT NULL,
        ordinal INTEGER NOT NULL,
        seq BIGINT NOT NULL,
        batch_id TEXT NOT NULL,
        user_id TEXT COLLATE "C" NOT NULL,
        segment_id TEXT COLLATE "C" NOT NULL,
        op TEXT NOT NULL
    )
    """,
    # Finds a chunk's rows (restaging) and a partition's rows up to an end marker (merge).
    "CREATE INDEX IF NOT EXISTS staged_changes_stamp"
    " ON staged_changes (partition, source_position, part)",
    """
    CREATE TABLE IF NOT EXISTS load_ledger (
        batch_id TEXT NOT NULL,
        partition INTEGER NOT NULL,
        rows_loaded BIGINT NOT NULL,
        added BIGINT NOT NULL,
        removed BIGINT NOT NULL,
        loaded_at TIMESTAMP NOT NULL,
        PRIMARY KEY (batch_id, partition)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS merge_watermark (
        partition INTEGER PRIMARY KEY,
        source_position TEXT COLLATE "C" NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS batch_status (
        batch_id TEXT PRIMARY KEY,
        status TEXT,
        rows BIGINT,
        rejected BIGINT,
        partitions INTEGER,
        submitted_at TIMESTAMP,
        published_at TIMESTAMP,
        closed_at TIMESTAMP,
        failed_at TIMESTAMP,
        error TEXT,
        detail JSON
    )
    """,
)
STAGE_COLUMNS = ("partition", "source_position", "part", "ordinal", "seq", "batch_id",
                 "user_id", "segment_id", "op")
# source_position: its key (text, see base.py), as in the staging table.
STAGE_TYPES = ("int4", "text", "int4", "int4", "int8", "text", "text", "text", "text")
COPY_STAGED = (f"COPY staged_changes ({', '.join(STAGE_COLUMNS)})"
               " FROM STDIN (FORMAT BINARY)")
# A chunk's own rows: of its batch, in its range of stamps (the chunks of other batches of
# the partition interleave with it in that range: batches interleave on a partition).
DELETE_CHUNK = """
    DELETE FROM staged_changes
    WHERE partition = %(partition)s AND batch_id = %(batch)s
      AND (source_position, part) BETWEEN (%(lo)s, %(lo_part)s) AND (%(hi)s, %(hi_part)s)
"""
# The last change per (segment, user) among the partition's staged changes up to the end
# marker, in log order (DISTINCT ON keeps one row per key, so the ON CONFLICT below never
# touches a row twice), then removals deleted and adds upserted in one statement (the two
# touch disjoint keys). xmax = 0: the row was inserted, not updated (a re-add).
MERGE = """
    WITH staged AS (
        SELECT * FROM staged_changes
        WHERE partition = %(partition)s AND source_position <= %(through)s
    ), last AS (
        SELECT DISTINCT ON (segment_id, user_id) segment_id, user_id, op, seq, batch_id
        FROM staged
        ORDER BY segment_id, user_id, source_position DESC, part DESC, ordinal DESC
    ), removed AS (
        DELETE FROM segment_members m USING last c
        WHERE c.op = 'remove' AND m.segment_id = c.segment_id AND m.user_id = c.user_id
        RETURNING 1
    ), added AS (
        INSERT INTO segment_members (segment_id, user_id, batch_id, updated_seq)
        SELECT segment_id, user_id, batch_id, seq FROM last WHERE op = 'add'
        ON CONFLICT (segment_id, user_id) DO UPDATE
            SET batch_id = excluded.batch_id, updated_seq = excluded.updated_seq
        RETURNING (xmax = 0) AS inserted
    )
    SELECT (SELECT count(*) FROM staged), (SELECT count(*) FROM added WHERE inserted),
           (SELECT count(*) FROM removed)
"""
DELETE_MERGED = ("DELETE FROM staged_changes"
                 " WHERE partition = %(partition)s AND source_position <= %(through)s")


def is_transient(exc: BaseException) -> bool:
    """Serialization failures, deadlocks and lost connections, by SQLSTATE: a connection
    that broke before the server said anything has none, and is an OperationalError."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state in RETRY_SQLSTATES or state.startswith("08")


def is_ledger_race(exc: BaseException) -> bool:
    """Two merges of one (batch, partition) committing at once: the ledger key held."""
    diag = getattr(exc, "diag", None)
    return (isinstance(exc, psycopg.Error) and exc.sqlstate == UNIQUE_VIOLATION
            and diag is not None and diag.table_name == "load_ledger")


def redact(url: str) -> str:
    """The URL without its password, for messages and locations."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class PgTx:
    """The shared rules' view of a psycopg transaction (`?` becomes `%s`)."""

    def __init__(self, cur: psycopg.Cursor[Any]):
        self.cur = cur

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.cur.execute(sql.replace("?", "%s"), list(params))
        return self.cur.fetchall() if self.cur.description else []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.cur.execute(sql.replace("?", "%s"), list(params))


class PostgresWarehouse:
    """A bounded pool of connections per instance (one instance per worker process): the
    server's connection limit, not the number of workers, bounds the concurrency."""

    dialect = "PostgreSQL"
    schema: tuple[str, ...] = SCHEMA

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 2,
        attempts: int = 6,
        backoff_s: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._pool = ConnectionPool(
            url, min_size=1, max_size=max(1, max_connections), open=False,
            kwargs={"autocommit": True}, timeout=connect_timeout_s,
            # A pooled connection that died while idle is found before use.
            check=ConnectionPool.check_connection, name="warehouse")
        try:
            self._retry("open", lambda: self._pool.open(wait=True, timeout=connect_timeout_s))
            self._transaction("create schema", self._create_schema)
        except BaseException:
            self._pool.close()
            raise

    def location(self) -> str:
        return f"{redact(self.url)}#segment_members"

    # -- plumbing ---------------------------------------------------------------------

    def _retry(self, what: str, fn: Callable[[], T],
               transient: Callable[[BaseException], bool] = is_transient) -> T:
        return with_retries(what, fn, transient=transient,
                            describe=f"{self.dialect} warehouse {redact(self.url)}",
                            attempts=self._attempts, backoff_s=self._backoff_s,
                            sleep=self._sleep, errors=(psycopg.Error, TimeoutError))

    def _transaction(self, what: str, body: Callable[[psycopg.Cursor[Any]], T],
                     transient: Callable[[BaseException], bool] = is_transient) -> T:
        """body in one transaction on a pooled connection, retried whole (a fresh
        connection each time: the pool discards a broken one) on transient errors."""

        def once() -> T:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                return body(cur)

        return self._retry(what, once, transient)

    def _query(self, what: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._transaction(what, lambda cur: PgTx(cur).rows(sql, params))

    def _create_schema(self, cur: psycopg.Cursor[Any]) -> None:
        # Workers start together: CREATE ... IF NOT EXISTS races on the catalog otherwise.
        cur.execute("SELECT pg_advisory_xact_lock(%s, -1)", [LOCK_SPACE])
        for ddl in self.schema:
            cur.execute(ddl)
        # A database made before wide positions: its BIGINT positions become their keys.
        for table, column in narrow_position_columns(PgTx(cur)):
            cur.execute(f'ALTER TABLE {table} ALTER COLUMN {column} TYPE TEXT COLLATE "C"'
                        f" USING {KEY_OF_BIGINT.format(c=column)}")

    # -- loads ------------------------------------------------------------------------

    def stage(self, changes: ChangeSet) -> None:
        """COPY one chunk into staged_changes (binary), but for its changes at or below the
        partition's merge watermark (merged already); staging it again replaces it."""
        if not len(changes):
            return
        (lo, lo_part), (hi, hi_part) = chunk_bounds(changes)

        def body(cur: psycopg.Cursor[Any]) -> None:
            table = rows_to_stage(PgTx(cur), changes)
            if table is None:
                return
            cur.execute(DELETE_CHUNK, {"partition": changes.partition,
                                       "batch": changes.batch_id, "lo": positions.key(lo),
                                       "lo_part": lo_part, "hi": positions.key(hi),
                                       "hi_part": hi_part})
            copy_rows(cur, changes.batch_id, changes.partition, table)

        self._transaction(f"stage {changes.batch_id}/{changes.partition}", body)

    def drop_staged(self, partition: int) -> None:
        """Forgets what is staged of a partition (its open batches are about to be re-read)."""
        self._transaction(f"drop staged changes of partition {partition}", lambda cur: cur.execute(
            "DELETE FROM staged_changes WHERE partition = %s", [partition]))

    def watermark(self, partition: int) -> int | None:
        """The source position up to which the partition is merged (None: nothing yet)."""
        rows = self._query("read merge_watermark",
                           "SELECT source_position FROM merge_watermark WHERE partition = ?",
                           [partition])
        return positions.stored(rows[0][0]) if rows else None

    def is_loaded(self, batch_id: str, partition: int) -> bool:
        return bool(self._query("read load_ledger",
                                "SELECT 1 FROM load_ledger WHERE batch_id = ? AND partition = ?",
                                [batch_id, partition]))

    def merge(self, batch_id: str, partition: int, end_position: int) -> LoadResult:
        """At the end marker of (batch, partition), whose source position is end_position:
        applies every staged change of the partition (any batch) at or below it, in log
        order (last change per key wins), once, with the ledger row and the watermark."""

        def body(cur: psycopg.Cursor[Any]) -> LoadResult:
            self._lock_partition(cur, partition)
            result = merge_once(PgTx(cur), batch_id, partition, end_position, self._apply)
            # Members, ledger row and watermark written, the transaction not committed.
            crash_point("postgres.inside_merge")
            return result

        return self._transaction(f"merge {batch_id}/{partition}", body,
                                 lambda exc: is_transient(exc) or is_ledger_race(exc))

    def _lock_partition(self, cur: psycopg.Cursor[Any], partition: int) -> None:
        # Held to the end of the transaction: released by COMMIT, ROLLBACK or a lost session.
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [LOCK_SPACE, partition])

    def _apply(self, tx: Tx, batch_id: str, partition: int,
               end_position: int) -> tuple[int, int, int]:
        cur = tx.cur  # type: ignore[attr-defined]
        params = {"partition": partition, "through": positions.key(end_position)}
        cur.execute(MERGE, params)
        rows_loaded, added, removed = cur.fetchone()
        cur.execute(DELETE_MERGED, params)
        return rows_loaded, added, removed

    def reset_segments(self) -> None:
        """Empties the membership, its staging, its ledger and its watermarks in one
        transaction, for a replay from the beginning (batch_status is kept)."""
        self._transaction("reset segment tables", lambda cur: cur.execute(
            f"TRUNCATE {', '.join(SEGMENT_TABLES)}"))

    # -- batch status -------------------------------------------------------------------

    def upsert_batch_status(self, rows: list[dict[str, Any]]) -> None:
        """Insert or wholly replace status rows keyed by batch_id (timestamps in epoch ms)."""
        table = status_table(rows)
        if table.num_rows == 0:
            return
        for c in TIMESTAMP_COLUMNS:  # epoch ms, converted by the server (no local time)
            table = table.set_column(table.schema.get_field_index(c), c,
                                     table[c].cast(pa.int64()))
        values = [[row[c] for c in STATUS_COLUMNS] for row in table.to_pylist()]
        cols = ", ".join(STATUS_COLUMNS)
        marks = ", ".join(
            "to_timestamp(%s / 1000.0) AT TIME ZONE 'UTC'" if c in TIMESTAMP_COLUMNS
            else "%s::json" if c == "detail" else "%s" for c in STATUS_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in STATUS_COLUMNS[1:])
        statement = (f"INSERT INTO batch_status ({cols}) VALUES ({marks})"
                     f" ON CONFLICT (batch_id) DO UPDATE SET {updates}")
        self._transaction("upsert batch_status", lambda cur: cur.executemany(statement, values))

    def batch_status(self, batch_id: str) -> dict[str, Any] | None:
        """One status row as upserted (timestamps back in epoch ms, detail as text)."""
        cols = ", ".join(
            f"(extract(epoch FROM {c}) * 1000)::bigint AS {c}" if c in TIMESTAMP_COLUMNS
            else "detail::text" if c == "detail" else c for c in STATUS_COLUMNS)
        rows = self._query("read batch_status",
                           f"SELECT {cols} FROM batch_status WHERE batch_id = ?", [batch_id])
        return dict(zip(STATUS_COLUMNS, rows[0], strict=True)) if rows else None

    # -- reads ----------------------------------------------------------------------------

    def members(self, segment_id: str | None = None) -> list[tuple[str, str]]:
        """(segment_id, user_id) of current members, sorted (bytewise, as DuckDB sorts)."""
        where, params = ("WHERE segment_id = ?", [segment_id]) if segment_id is not None \
            else ("", [])
        rows = self._query(
            "read segment_members",
            f'SELECT segment_id, user_id FROM segment_members {where}'
            ' ORDER BY segment_id, user_id', params)
        return [tuple(r) for r in rows]

    def ledger(self) -> list[LedgerRow]:
        return [LedgerRow(*r) for r in self._query("read load_ledger", LEDGER_ALL)]

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgresWarehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_rows(cur: psycopg.Cursor[Any], batch_id: str, partition: int,
              table: pa.Table) -> None:
    """Binary COPY of a chunk's rows (the columns of `rows_to_stage`) into staged_changes."""
    n = table.num_rows
    columns = (
        [partition] * n,
        table["source_position"].to_pylist(),
        table["part"].to_pylist(),
        table["ordinal"].to_pylist(),
        table["seq"].to_pylist(),
        [batch_id] * n,
        table["user_id"].to_pylist(),
        table["segment_id"].to_pylist(),
        table["op"].to_pylist(),
    )
    half = n // 2
    with cur.copy(pgsql.SQL(COPY_STAGED)) as copy:
        copy.set_types(list(STAGE_TYPES))
        for i, row in enumerate(zip(*columns, strict=True)):
            if i == half:  # mid-COPY: part of the chunk's rows sent, nothing committed
                crash_point("postgres.inside_copy")
            copy.write_row(row)

"""DuckDB warehouse (the default): bulk staging from Arrow into a TEMP table, then one
merge transaction per load. One writer at a time: DuckDB locks its file, so one process
runs the warehouse role (streams/warehouse_wait.py makes others wait). The merge rules
are the shared ones (connectors/warehouses/base.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

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
from topics import positions

T = TypeVar("T")

_SCHEMA = (
    # One row per (segment_id, user_id), kept so by merge (the only writer): it groups the
    # changes by that key and inserts only keys with no row. No PRIMARY KEY on purpose:
    # DuckDB maintains it as an ART index whose deletes made a 1M-change merge commit
    # take 4-5 s instead of 0.1 s (measured on DuckDB 2.0).
    """
    CREATE TABLE IF NOT EXISTS segment_members (
        segment_id VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        batch_id VARCHAR NOT NULL,
        updated_seq BIGINT NOT NULL
    )
    """,
    # (source_position, part, ordinal): where the change is in the log, which orders the
    # changes of a partition across batches. ordinal: row within the chunk (a message's
    # rows are in one chunk, in order). seq cannot order: replace end-marker removals all
    # carry seq -1 and come after the rows they follow.
    # TEMP: staging needs no durability (the change sink re-reads an open batch from its
    # start after a crash), and skipping the write-ahead log made staging 5x cheaper.
    # load: a number the instance gives each open (batch, partition), which lives as long
    # as this TEMP table; a batch id on every staged row took a third of its memory.
    """
    CREATE TEMP TABLE IF NOT EXISTS staged_changes (
        load INTEGER NOT NULL,
        source_position VARCHAR NOT NULL,
        part INTEGER NOT NULL,
        ordinal INTEGER NOT NULL,
        seq BIGINT NOT NULL,
        user_id VARCHAR NOT NULL,
        segment_id VARCHAR NOT NULL,
        op VARCHAR NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS load_ledger (
        batch_id VARCHAR NOT NULL,
        partition INTEGER NOT NULL,
        rows_loaded BIGINT NOT NULL,
        added BIGINT NOT NULL,
        removed BIGINT NOT NULL,
        loaded_at TIMESTAMP NOT NULL,
        PRIMARY KEY (batch_id, partition)
    )
    """,
    # Per partition of the changes topic: the source position of the last end marker
    # merged. Everything of the partition at or below it is in segment_members. Positions
    # are their keys (base.py; VARCHAR compares bytewise in DuckDB).
    """
    CREATE TABLE IF NOT EXISTS merge_watermark (
        partition INTEGER PRIMARY KEY,
        source_position VARCHAR NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS batch_status (
        batch_id VARCHAR PRIMARY KEY,
        status VARCHAR,
        rows BIGINT,
        rejected BIGINT,
        partitions INTEGER,
        submitted_at TIMESTAMP,
        published_at TIMESTAMP,
        closed_at TIMESTAMP,
        failed_at TIMESTAMP,
        error VARCHAR,
        detail JSON
    )
    """,
)


# Last change per (segment, user) among the staged changes of one partition up to an end
# marker (`_merging`: which rows, and the batch of each load), in log order: by source
# position (its key), part and row within the chunk, as one struct (compared field by
# field), and whether the user is a member now. arg_max is the set-based "last row wins": it
# measured ~25% less CPU than QUALIFY row_number() OVER (PARTITION BY ... ORDER BY ...) = 1
# on 1M rows; the struct of a key costs no more than the HUGEINT packing of a BIGINT
# position did (0.10 s and 0.12 s on 1M rows).
_MERGING = """
    load IN (SELECT load FROM _staged_loads) AND source_position <= $through
"""
_LAST_CHANGES = f"""
    CREATE OR REPLACE TEMP TABLE _last_changes AS
    SELECT c.segment_id, c.user_id, c.op, c.seq, l.batch_id, m.user_id IS NOT NULL AS present
    FROM (
        SELECT segment_id, user_id, last.op, last.seq, last.load
        FROM (
            SELECT segment_id, user_id,
                   arg_max({{'op': op, 'seq': seq, 'load': load}},
                           (source_position, part, ordinal)) AS last
            FROM staged_changes
            WHERE {_MERGING}
            GROUP BY segment_id, user_id
        )
    ) c
    JOIN _staged_loads l ON l.load = c.load
    LEFT JOIN segment_members m
        ON m.segment_id = c.segment_id AND m.user_id = c.user_id
"""
# Only rows whose membership changes are written, so counts are real changes and a
# re-add of a member costs an update, not a delete plus insert.
_DELETE_REMOVED = """
    DELETE FROM segment_members m USING _last_changes c
    WHERE c.op = 'remove' AND c.present
      AND m.segment_id = c.segment_id AND m.user_id = c.user_id
"""
_TOUCH_READDED = """
    UPDATE segment_members m SET batch_id = c.batch_id, updated_seq = c.seq
    FROM _last_changes c
    WHERE c.op = 'add' AND c.present
      AND m.segment_id = c.segment_id AND m.user_id = c.user_id
"""
_INSERT_ADDED = """
    INSERT INTO segment_members (segment_id, user_id, batch_id, updated_seq)
    SELECT segment_id, user_id, batch_id, seq FROM _last_changes
    WHERE op = 'add' AND NOT present
"""



def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: a file lock held by another process, a write-write conflict."""
    text = str(exc).lower()
    if isinstance(exc, duckdb.TransactionException):
        return "conflict" in text
    if isinstance(exc, duckdb.IOException | duckdb.ConnectionException):
        return "lock" in text
    return False


class _DuckTx:
    """The shared rules' view of a DuckDB transaction (DuckDB takes `?` as is)."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, list(params)).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.con.execute(sql, list(params))


class DuckDBWarehouse:
    """One connection per instance (the bound on connections per worker)."""

    def __init__(
        self,
        path: Path,
        *,
        attempts: int = 5,
        backoff_s: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        threads: int | None = None,
        memory_limit: str = "",
    ) -> None:
        self.path = Path(path)
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._sleep = sleep
        # A DuckDB connection must not run two statements at once.
        self._lock = threading.Lock()
        # Open (batch, partition) -> its load number in staged_changes; never reused.
        self._loads: dict[tuple[str, int], int] = {}
        # Per load, the stamp ranges (first, last) of the chunks staged into it.
        self._ranges: dict[int, list[tuple[tuple[int, int], tuple[int, int]]]] = {}
        self._next_load = 1
        self._con = self._retry("open", lambda: duckdb.connect(str(self.path)))
        # Row order of a table means nothing here (merge orders by explicit columns), and
        # dropping it lets DuckDB materialize and insert in parallel without reordering.
        self._con.execute("SET preserve_insertion_order = false")
        if threads is not None:
            self._con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            try:
                self._retry(f"setting memory_limit to {memory_limit!r}",
                            lambda: self._con.execute("SET memory_limit = ?", [memory_limit]))
            except Exception:
                self._con.close()
                raise
        self._transaction("create schema", self._create_schema)

    def location(self) -> str:
        return f"duckdb://{self.path.resolve()}#segment_members"

    # -- plumbing ---------------------------------------------------------------------

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(what, fn, transient=is_transient,
                            describe=f"DuckDB database {self.path}", attempts=self._attempts,
                            backoff_s=self._backoff_s, sleep=self._sleep, errors=duckdb.Error)

    def _transaction(
        self,
        what: str,
        body: Callable[[duckdb.DuckDBPyConnection], T],
        arrow: dict[str, pa.Table] | None = None,
    ) -> T:
        """Run body in one transaction, retried whole on transient errors.

        arrow: tables body reads by name. Registered outside the transaction: after a
        failed statement DuckDB refuses even unregister until ROLLBACK.
        """
        views = arrow or {}

        def once() -> T:
            con = self._con
            con.execute("BEGIN TRANSACTION")
            try:
                result = body(con)
                con.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return result

        with self._lock:
            for name, table in views.items():
                self._con.register(name, table)
            try:
                return self._retry(what, once)
            finally:
                for name in views:
                    self._con.unregister(name)

    def _rollback(self) -> None:
        # A failed COMMIT has already rolled back; ROLLBACK then reports no transaction.
        with contextlib.suppress(duckdb.TransactionException):
            self._con.execute("ROLLBACK")

    def _query(self, what: str, sql: str, params: list[Any] | None = None) -> list[Any]:
        with self._lock:
            return self._retry(what, lambda: self._con.execute(sql, params).fetchall())

    @staticmethod
    def _create_schema(con: duckdb.DuckDBPyConnection) -> None:
        for ddl in _SCHEMA:
            con.execute(ddl)
        # A database made before wide positions: its BIGINT positions become their keys.
        for table, column in narrow_position_columns(_DuckTx(con)):
            con.execute(f"ALTER TABLE {table} ALTER {column} TYPE VARCHAR"
                        f" USING {KEY_OF_BIGINT.format(c=column)}")

    # -- loads ------------------------------------------------------------------------

    def stage(self, changes: ChangeSet) -> None:
        """Bulk-insert one chunk into staged_changes, but for its changes at or below the
        partition's merge watermark (merged already); staging it again replaces it."""
        if not len(changes):
            return
        (lo, lo_part), (hi, hi_part) = chunk_bounds(changes)

        def body(con: duckdb.DuckDBPyConnection) -> None:
            table = rows_to_stage(_DuckTx(con), changes)
            if table is None:
                return
            load = self._load(changes.batch_id, changes.partition)
            # Only a chunk staged again (its range meets one staged before in this load)
            # can have rows there: the first staging of a chunk, the common case, skips
            # the DELETE, a scan of the open batches' rows (string keys prune nothing:
            # DuckDB's zone maps keep 8 bytes of a string, and keys share their leading
            # zeros, or a Kinesis shard's leading digits).
            if any(a <= (hi, hi_part) and (lo, lo_part) <= b
                   for a, b in self._ranges.get(load, ())):
                con.execute(
                    """
                    DELETE FROM staged_changes
                    WHERE load = $load AND source_position BETWEEN $lo AND $hi
                      AND (source_position, part) BETWEEN ($lo, $lo_part) AND ($hi, $hi_part)
                    """,
                    {"load": load, "lo": positions.key(lo), "lo_part": lo_part,
                     "hi": positions.key(hi), "hi_part": hi_part},
                )
            # Read by DuckDB's replacement scan of this local: which rows depends on the
            # watermark read in this transaction, and a scan needs no unregister (which
            # DuckDB refuses after a failed statement until ROLLBACK).
            chunk_rows = table  # noqa: F841
            con.execute(
                f"""
                INSERT INTO staged_changes (load, source_position, part, ordinal, seq,
                                            user_id, segment_id, op)
                SELECT {load}, source_position, part, ordinal, seq, user_id, segment_id, op
                FROM chunk_rows
                """
            )

        self._transaction(f"stage {changes.batch_id}/{changes.partition}", body)
        load = self._loads.get((changes.batch_id, changes.partition))
        if load is not None:
            self._ranges.setdefault(load, []).append(((lo, lo_part), (hi, hi_part)))

    def _load(self, batch_id: str, partition: int) -> int:
        """The number of an open (batch, partition) in staged_changes."""
        load = self._loads.get((batch_id, partition))
        if load is None:
            load = self._loads[(batch_id, partition)] = self._next_load
            self._next_load += 1
        return load

    def _staged_loads(self, partition: int) -> pa.Table:
        """The loads of a partition's open batches, and their batch ids."""
        loads = [(n, b) for (b, p), n in self._loads.items() if p == partition]
        return pa.table({"load": pa.array([n for n, _b in loads], pa.int32()),
                         "batch_id": pa.array([b for _n, b in loads], pa.string())})

    def watermark(self, partition: int) -> int | None:
        """The source position up to which the partition is merged (None: nothing yet)."""
        rows = self._query(
            "read merge_watermark",
            "SELECT source_position FROM merge_watermark WHERE partition = ?",
            [partition],
        )
        return positions.stored(rows[0][0]) if rows else None

    def drop_staged(self, partition: int) -> None:
        """Forgets what is staged of a partition (its open batches are about to be re-read)."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("DELETE FROM staged_changes WHERE load IN (SELECT load FROM _staged_loads)")

        self._transaction(f"drop staged changes of partition {partition}", body,
                          {"_staged_loads": self._staged_loads(partition)})
        for key in [k for k in self._loads if k[1] == partition]:
            self._ranges.pop(self._loads.pop(key), None)

    def is_loaded(self, batch_id: str, partition: int) -> bool:
        rows = self._query(
            "read load_ledger",
            "SELECT 1 FROM load_ledger WHERE batch_id = ? AND partition = ?",
            [batch_id, partition],
        )
        return bool(rows)

    def merge(self, batch_id: str, partition: int, end_position: int) -> LoadResult:
        """At the end marker of (batch, partition), whose source position is end_position:
        applies every staged change of the partition (any batch) at or below it, in log
        order (last change per key wins), once."""

        def body(con: duckdb.DuckDBPyConnection) -> LoadResult:
            return merge_once(_DuckTx(con), batch_id, partition, end_position, _apply,
                              _write_watermark)

        result = self._transaction(f"merge {batch_id}/{partition}", body,
                                   {"_staged_loads": self._staged_loads(partition)})
        # Every change of the batch in this partition is at or below its end marker.
        self._ranges.pop(self._loads.pop((batch_id, partition), -1), None)
        return result

    def reset_segments(self) -> None:
        """Empties the membership, its staging, its ledger and its watermarks in one
        transaction, for a replay from the beginning that rebuilds them (batch_status is
        kept)."""

        def body(con: duckdb.DuckDBPyConnection) -> None:
            for table in SEGMENT_TABLES:
                con.execute(f"DELETE FROM {table}")

        self._transaction("reset segment tables", body)
        self._loads.clear()
        self._ranges.clear()

    # -- batch status -------------------------------------------------------------------

    def upsert_batch_status(self, rows: list[dict[str, Any]]) -> None:
        """Insert or wholly replace status rows keyed by batch_id (timestamps in epoch ms)."""
        table = status_table(rows)
        if table.num_rows == 0:
            return
        updates = ", ".join(f"{c} = excluded.{c}" for c in STATUS_COLUMNS[1:])

        def body(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                f"""
                INSERT INTO batch_status ({", ".join(STATUS_COLUMNS)})
                SELECT * REPLACE (CAST(detail AS JSON) AS detail) FROM _status
                ON CONFLICT (batch_id) DO UPDATE SET {updates}
                """
            )

        self._transaction("upsert batch_status", body, {"_status": table})

    def batch_status(self, batch_id: str) -> dict[str, Any] | None:
        """One status row as upserted (timestamps back in epoch ms, detail as text)."""
        cols = ", ".join(
            f"epoch_ms({c}) AS {c}" if c in TIMESTAMP_COLUMNS else c for c in STATUS_COLUMNS
        )
        rows = self._query(
            "read batch_status",
            f"SELECT {cols} FROM batch_status WHERE batch_id = ?",
            [batch_id],
        )
        return dict(zip(STATUS_COLUMNS, rows[0], strict=True)) if rows else None

    # -- reads ----------------------------------------------------------------------------

    def members(self, segment_id: str | None = None) -> list[tuple[str, str]]:
        """(segment_id, user_id) of current members, sorted."""
        where, params = (
            ("WHERE segment_id = ?", [segment_id]) if segment_id is not None else ("", [])
        )
        return self._query(
            "read segment_members",
            f"SELECT segment_id, user_id FROM segment_members {where} ORDER BY 1, 2",
            params,
        )

    def ledger(self) -> list[LedgerRow]:
        return [LedgerRow(*r) for r in self._query("read load_ledger", LEDGER_ALL)]

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> DuckDBWarehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _apply(tx: Tx, batch_id: str, partition: int, end_position: int) -> tuple[int, int, int]:
    """The partition's staged changes up to end_position folded into segment_members
    (`_staged_loads` is registered by merge); (rows, added, removed)."""
    con = tx.con  # type: ignore[attr-defined]
    params = {"through": positions.key(end_position)}
    ((rows_loaded,),) = con.execute(
        f"SELECT count(*) FROM staged_changes WHERE {_MERGING}", params).fetchall()
    con.execute(_LAST_CHANGES, params)
    ((removed,),) = con.execute(_DELETE_REMOVED).fetchall()
    con.execute(_TOUCH_READDED).fetchall()
    ((added,),) = con.execute(_INSERT_ADDED).fetchall()
    con.execute("DROP TABLE _last_changes")
    con.execute(f"DELETE FROM staged_changes WHERE {_MERGING}", params)
    return rows_loaded, added, removed


def _write_watermark(tx: Tx, partition: int, position: int) -> None:
    # ON CONFLICT: DuckDB's delete + insert of one key in a transaction trips its index.
    tx.execute("INSERT INTO merge_watermark VALUES (?, ?) ON CONFLICT (partition)"
               " DO UPDATE SET source_position = excluded.source_position",
               [partition, positions.key(position)])

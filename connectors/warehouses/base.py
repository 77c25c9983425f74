"""What every warehouse dialect shares: the interface the sinks use, the load ledger and
merge watermark rules, and the batch_status rows.

Merge in log order: batches may interleave on a partition, and the segments processor
folds their changes in log order, so the merge at the end marker of (batch, partition)
applies every staged change of the partition, of any batch, at or below the marker's
source position, ordered by (source_position, part, row). The same transaction records the
(batch, partition) in the load ledger and the partition's merge watermark (that source
position). Changes at or below the watermark are not staged again (a batch re-read after a
crash), and a merge at or below it does nothing: each change lands exactly once.

The rules are written once here (`stage_rows`, `merge_once`) against `Tx`, a transaction
of any dialect; each dialect supplies its SQL for staging a chunk and applying the last
change per (segment, user).

Positions are stored as their keys (topics/positions.py): text of any width (a Kinesis
position is far above 2**64) whose bytewise order is the positions' order, so staging and
watermark columns are text compared bytewise (COLLATE "C" on PostgreSQL) and every SQL
comparison (`<=`, BETWEEN, ORDER BY) holds at any width. Tables made before wide positions
(BIGINT columns) are altered when a warehouse opens them (`POSITION_COLUMNS`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from connectors.change_set import ChangeSet
from topics import positions

T = TypeVar("T")


class WarehouseError(Exception):
    """A warehouse operation failed for good; the message names the warehouse."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Outcome of merge(); counts are read back from the ledger when already loaded."""

    batch_id: str
    partition: int
    rows_loaded: int  # staged changes applied, of any batch of the partition, in log order
    added: int  # members that were absent and are now present
    removed: int  # members that were present and are now absent
    already_loaded: bool = False


class LedgerRow(NamedTuple):
    batch_id: str
    partition: int
    rows_loaded: int
    added: int
    removed: int
    loaded_at: datetime  # UTC, naive


class Warehouse(Protocol):
    """What the warehouse sink, the status sink, replay and verify use."""

    def stage(self, changes: ChangeSet) -> None: ...
    def merge(self, batch_id: str, partition: int, end_position: int) -> LoadResult: ...
    def drop_staged(self, partition: int) -> None: ...
    def watermark(self, partition: int) -> int | None: ...
    def is_loaded(self, batch_id: str, partition: int) -> bool: ...
    def reset_segments(self) -> None: ...
    def upsert_batch_status(self, rows: list[dict[str, Any]]) -> None: ...
    def batch_status(self, batch_id: str) -> dict[str, Any] | None: ...
    def members(self, segment_id: str | None = None) -> list[tuple[str, str]]: ...
    def ledger(self) -> list[LedgerRow]: ...
    def location(self) -> str: ...
    def close(self) -> None: ...


class Tx(Protocol):
    """One open transaction. SQL of the shared rules uses `?` placeholders."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...


# -- the shared rules ---------------------------------------------------------------------

LEDGER_ROW = ("SELECT rows_loaded, added, removed FROM load_ledger"
              " WHERE batch_id = ? AND partition = ?")
LEDGER_INSERT = ("INSERT INTO load_ledger (batch_id, partition, rows_loaded, added, removed,"
                 " loaded_at) VALUES (?, ?, ?, ?, ?, ?)")
WATERMARK = "SELECT source_position FROM merge_watermark WHERE partition = ?"
# Delete + insert: one form every dialect runs (Redshift has no ON CONFLICT).
WATERMARK_WRITE = ("DELETE FROM merge_watermark WHERE partition = ?",
                   "INSERT INTO merge_watermark (partition, source_position) VALUES (?, ?)")
LEDGER_ALL = ("SELECT batch_id, partition, rows_loaded, added, removed, loaded_at"
              " FROM load_ledger ORDER BY batch_id, partition")
SEGMENT_TABLES = ("segment_members", "staged_changes", "load_ledger", "merge_watermark")


# (table, column) holding positions: text keys now, BIGINT in tables made before.
POSITION_COLUMNS = (("staged_changes", "source_position"), ("merge_watermark", "source_position"))
COLUMN_TYPE = ("SELECT data_type FROM information_schema.columns"
               " WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?")
# SQL of an old BIGINT column's values as keys: 20 zero-padded digits (none is negative:
# positions stored there are those of input messages).
KEY_OF_BIGINT = "LPAD(CAST({c} AS VARCHAR), 20, '0')"


def narrow_position_columns(tx: Tx) -> list[tuple[str, str]]:
    """The POSITION_COLUMNS still of an integer type (a warehouse made by older code)."""
    narrow = []
    for table, column in POSITION_COLUMNS:
        rows = tx.rows(COLUMN_TYPE, [table, column])
        if rows and rows[0][0].lower() in ("bigint", "int8", "integer", "int4"):
            narrow.append((table, column))
    return narrow


def watermark_in(tx: Tx, partition: int) -> int | None:
    rows = tx.rows(WATERMARK, [partition])
    return positions.stored(rows[0][0]) if rows else None


def rows_to_stage(tx: Tx, changes: ChangeSet) -> pa.Table | None:
    """The chunk's rows still to stage, with their row number in the chunk (`ordinal`): none
    (None) for a chunk re-sent after its merge committed (staging it would leak), else those
    after the partition's merge watermark."""
    merged = watermark_in(tx, changes.partition)
    keys = changes.columns["source_position"]
    if merged is not None and positions.from_key(keys[-1].as_py()) <= merged:
        return None
    table = changes.columns.append_column(
        "ordinal", pa.array(range(len(changes)), pa.int32()))
    if merged is not None:  # keys compare as the positions do
        table = table.filter(pc.greater(keys, pa.scalar(positions.key(merged), pa.string())))
    return table


def chunk_bounds(changes: ChangeSet) -> tuple[tuple[int, int], tuple[int, int]]:
    """First and last stamps of a chunk: a (batch, partition)'s chunks cover disjoint runs
    of stamps, and so do different batches' (different input messages), so these say which
    staged rows are this chunk's."""
    cols = changes.columns
    return ((changes.first_position, changes.first_part),
            (positions.from_key(cols["source_position"][-1].as_py()), cols["part"][-1].as_py()))


Apply = Callable[[Tx, str, int, int], tuple[int, int, int]]


def merge_once(tx: Tx, batch_id: str, partition: int, end_position: int, apply: Apply,
               write_watermark: Callable[[Tx, int, int], None] | None = None) -> LoadResult:
    """The merge rule, in the caller's transaction: once per (batch, partition) (the
    ledger key), never at or below the partition's watermark; apply(tx, batch_id,
    partition, end_position) folds the staged changes and gives (rows, added, removed)."""
    done = tx.rows(LEDGER_ROW, [batch_id, partition])
    if done:
        rows_loaded, added, removed = done[0]
        return LoadResult(batch_id, partition, rows_loaded, added, removed, True)
    merged = watermark_in(tx, partition)
    if merged is not None and end_position <= merged:
        return LoadResult(batch_id, partition, 0, 0, 0, already_loaded=True)
    rows_loaded, added, removed = apply(tx, batch_id, partition, end_position)
    tx.execute(LEDGER_INSERT, [batch_id, partition, rows_loaded, added, removed, utc_now()])
    (write_watermark or _write_watermark)(tx, partition, end_position)
    return LoadResult(batch_id, partition, rows_loaded, added, removed)


def _write_watermark(tx: Tx, partition: int, position: int) -> None:
    delete, insert = WATERMARK_WRITE
    tx.execute(delete, [partition])
    tx.execute(insert, [partition, positions.key(position)])


def with_retries(what: str, fn: Callable[[], T], *, transient: Callable[[BaseException], bool],
                 describe: str, attempts: int, backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep,
                 errors: type[BaseException] | tuple[type[BaseException], ...] = Exception,
                 ) -> T:
    """fn(), retried with exponential backoff and jitter while it fails transiently;
    a WarehouseError naming `describe` (the warehouse) when it fails for good."""
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return fn()
        except errors as exc:
            if attempt < attempts and transient(exc):
                # Jitter so that competing workers spread out.
                sleep(backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
                continue
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            raise WarehouseError(f"{what} failed on {describe}{tries}: {exc}") from exc
    raise AssertionError("unreachable")  # the loop returns or raises


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# -- batch status --------------------------------------------------------------------------

STATUS_COLUMNS = (
    "batch_id",
    "status",
    "rows",
    "rejected",
    "partitions",
    "submitted_at",
    "published_at",
    "closed_at",
    "failed_at",
    "error",
    "detail",
)
STATUS_TYPES = {
    "batch_id": pa.string(),
    "status": pa.string(),
    "rows": pa.int64(),
    "rejected": pa.int64(),
    "partitions": pa.int32(),
    "error": pa.string(),
    "detail": pa.string(),
}
TIMESTAMP_COLUMNS = ("submitted_at", "published_at", "closed_at", "failed_at")


def status_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Status dicts as one Arrow table, last row per batch_id winning (an upsert batch)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        unknown = row.keys() - set(STATUS_COLUMNS)
        if unknown:
            raise ValueError(f"batch_status row has unknown keys {sorted(unknown)}")
        if not row.get("batch_id"):
            raise ValueError(f"batch_status row without batch_id: {row!r}")
        latest[row["batch_id"]] = row
    columns: dict[str, pa.Array] = {}
    for col in STATUS_COLUMNS:
        values = [r.get(col) for r in latest.values()]
        if col == "detail":
            # Stored as JSON text; sorted keys so equal details compare equal.
            values = [
                v if v is None or isinstance(v, str) else json.dumps(v, sort_keys=True)
                for v in values
            ]
        typ = pa.timestamp("ms") if col in TIMESTAMP_COLUMNS else STATUS_TYPES[col]
        columns[col] = pa.array(values, typ)
    return pa.table(columns)

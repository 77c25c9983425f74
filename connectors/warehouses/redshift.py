"""Redshift warehouse: the PostgreSQL one's rules, loading through COPY from S3.

Where the rows come from, by convention: the S3 sink (connectors/s3_sink.py) writes each
chunk as `<s3_root>/<prefix>/batch=<id>/partition=<p>/part-<position>-<part>.parquet` and,
when it closes (batch, partition), that partition's `_manifest.json` (a Redshift COPY
manifest with content_length). The Redshift warehouse writes nothing to S3: it assumes the
S3 sink runs with the same --s3-root, --s3-prefix and --s3-format parquet, and has closed a
(batch, partition) before the warehouse merges it. The two sinks run apart (roles, workers),
so a merge first waits, bounded, until the objects its COPYs name exist (`exists`, the S3
sink's store); past the bound it fails naming the batch, the partition and the missing key.
So stage() only notes the chunk, and the merge at the end marker of (B, p), in one
transaction:

1. LOCK load_ledger (Redshift enforces no primary key: the lock makes the ledger check and
   the ledger row once-only; Redshift serialises writers anyway),
2. the ledger and watermark rules (base.merge_once),
3. COPY into a staging table made in this transaction (no TEMP table across calls, so it
   works on any pooled connection): B's partition manifest (`MANIFEST FORMAT AS PARQUET`),
   and each chunk of the partition's other open batches flushed before the marker, by its
   object key (their manifests do not exist yet: interleaved batches merge in log order),
4. the last change per (segment, user) after the watermark and up to the marker, then
   delete + update + insert into segment_members, the ledger row and the watermark.

Row order: COPY does not keep the row order of an object, so the order within one input
message is the change's seq (it rises along a message; seq -1, a replace end marker's
removal, comes only in that marker's own messages, one change per key).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from connectors.change_set import ChangeSet
from connectors.s3_sink import object_name
from connectors.warehouses.base import (
    KEY_OF_BIGINT,
    SEGMENT_TABLES,
    STATUS_COLUMNS,
    TIMESTAMP_COLUMNS,
    Tx,
    WarehouseError,
    chunk_bounds,
    narrow_position_columns,
    status_table,
)
from connectors.warehouses.postgres import PgTx, PostgresWarehouse, is_transient
from topics import positions

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS segment_members (
        segment_id VARCHAR(256) NOT NULL,
        user_id VARCHAR(256) NOT NULL,
        batch_id VARCHAR(256) NOT NULL,
        updated_seq BIGINT NOT NULL,
        PRIMARY KEY (segment_id, user_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS load_ledger (
        batch_id VARCHAR(256) NOT NULL,
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
        partition INTEGER NOT NULL PRIMARY KEY,
        source_position VARCHAR(256) NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS batch_status (
        batch_id VARCHAR(256) NOT NULL PRIMARY KEY,
        status VARCHAR(64),
        rows BIGINT,
        rejected BIGINT,
        partitions INTEGER,
        submitted_at TIMESTAMP,
        published_at TIMESTAMP,
        closed_at TIMESTAMP,
        failed_at TIMESTAMP,
        error VARCHAR(65535),
        detail VARCHAR(65535)
    )
    """,
)
# Columns in the order of the Parquet objects (connectors/change_set.ARROW_SCHEMA): COPY
# of a columnar format maps columns by position. Positions are their keys (base.py): text
# of up to 256 characters here (a position of up to ~250 digits; a Kinesis one, packed, is
# well under 200).
STAGING = """
    CREATE TEMP TABLE staged_load (
        batch_id VARCHAR(256) NOT NULL,
        partition INTEGER NOT NULL,
        user_id VARCHAR(256) NOT NULL,
        segment_id VARCHAR(256) NOT NULL,
        op VARCHAR(16) NOT NULL,
        seq BIGINT NOT NULL,
        source_position VARCHAR(256) NOT NULL,
        part INTEGER NOT NULL
    )
"""
MERGING = "partition = %s AND source_position > %s AND source_position <= %s"
LAST_CHANGES = f"""
    CREATE TEMP TABLE last_changes AS
    SELECT segment_id, user_id, op, seq, batch_id
    FROM (
        SELECT segment_id, user_id, op, seq, batch_id,
               ROW_NUMBER() OVER (PARTITION BY segment_id, user_id
                                  ORDER BY source_position DESC, part DESC, seq DESC) AS n
        FROM staged_load
        WHERE {MERGING}
    ) AS ranked
    WHERE n = 1
"""
COUNT_STAGED = f"SELECT COUNT(*) FROM staged_load WHERE {MERGING}"
DELETE_REMOVED = """
    DELETE FROM segment_members USING last_changes
    WHERE last_changes.op = 'remove'
      AND segment_members.segment_id = last_changes.segment_id
      AND segment_members.user_id = last_changes.user_id
"""
TOUCH_READDED = """
    UPDATE segment_members SET batch_id = last_changes.batch_id,
                               updated_seq = last_changes.seq
    FROM last_changes
    WHERE last_changes.op = 'add'
      AND segment_members.segment_id = last_changes.segment_id
      AND segment_members.user_id = last_changes.user_id
"""
INSERT_ADDED = """
    INSERT INTO segment_members (segment_id, user_id, batch_id, updated_seq)
    SELECT c.segment_id, c.user_id, c.batch_id, c.seq FROM last_changes AS c
    WHERE c.op = 'add' AND NOT EXISTS (
        SELECT 1 FROM segment_members AS m
        WHERE m.segment_id = c.segment_id AND m.user_id = c.user_id)
"""
DROP_STAGING = ("DROP TABLE last_changes", "DROP TABLE staged_load")


def pg_url(url: str) -> str:
    """redshift://user:pw@host:5439/db as the PostgreSQL-protocol URL psycopg takes."""
    return urlunsplit(urlsplit(url)._replace(scheme="postgresql"))


def s3_url(root: str) -> str:
    """The S3 sink's root as an s3:// URL (a Path-typed setting folds `//` into `/`)."""
    if root.startswith("s3:/") and not root.startswith("s3://"):
        root = "s3://" + root[len("s3:/"):]
    if not root.startswith("s3://"):
        raise ValueError(f"--s3-root {root!r}: a Redshift warehouse COPYs the S3 sink's "
                         "objects, so the S3 sink must write to s3://BUCKET[/PREFIX]")
    return root.rstrip("/")


def migrate_statements(table: str, column: str) -> list[str]:
    """A BIGINT position column as a VARCHAR of keys, on Redshift (whose ALTER COLUMN TYPE
    only changes a VARCHAR's length): add, fill, drop the old, rename."""
    new = f"{column}_key"
    return [f"ALTER TABLE {table} ADD COLUMN {new} VARCHAR(256) DEFAULT ''",
            f"UPDATE {table} SET {new} = {KEY_OF_BIGINT.format(c=column)}",
            f"ALTER TABLE {table} DROP COLUMN {column}",
            f"ALTER TABLE {table} RENAME COLUMN {new} TO {column}"]


def quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class RedshiftWarehouse(PostgresWarehouse):
    dialect = "Redshift"
    schema = SCHEMA

    def __init__(self, url: str, *, s3_root: str, prefix: str = "audience/segment-changes",
                 fmt: str = "parquet", iam_role: str = "",
                 trace: Callable[[str], None] | None = None,
                 exists: Callable[[str], bool] | None = None, s3_wait_s: float = 600.0,
                 **options: Any) -> None:
        if fmt != "parquet":
            raise ValueError(f"--s3-format {fmt!r}: the Redshift warehouse COPYs Parquet")
        self.s3_root = s3_url(s3_root)
        self.prefix = prefix.strip("/")
        self.iam_role = iam_role
        self._trace = trace  # sees every statement this class runs (tests parse them)
        # Whether a key (relative to s3_root) is on S3 yet; None: do not wait (the caller
        # orders the sinks itself).
        self._exists = exists
        self.s3_wait_s = s3_wait_s
        # Open (batch, partition) -> first stamps of its chunks noted so far.
        self._chunks: dict[tuple[str, int], dict[tuple[int, int], tuple[int, int]]] = {}
        self.redshift_url = url
        super().__init__(pg_url(url), **options)

    def location(self) -> str:
        from connectors.warehouses.postgres import redact

        return f"{redact(self.redshift_url)}#segment_members"

    def _create_schema(self, cur: psycopg.Cursor[Any]) -> None:
        for ddl in self.schema:
            self._exec(cur, ddl)
        # A database made before wide positions: its BIGINT watermark becomes keys. Redshift
        # alters no column's type but a VARCHAR's length: a new column replaces it.
        for table, column in narrow_position_columns(PgTx(cur)):
            for statement in migrate_statements(table, column):
                self._exec(cur, statement)

    def _exec(self, cur: psycopg.Cursor[Any], sql: str, params: Sequence[Any] = ()) -> None:
        if self._trace is not None:
            self._trace(sql)
        cur.execute(sql, list(params))

    # -- where the S3 sink put things --------------------------------------------------

    def _sources(self, batch_id: str, partition: int, end_position: int) -> list[str]:
        """What a merge COPYs, as keys under s3_root: the batch's partition manifest, then
        the chunks of the partition's other open batches flushed before its end marker."""
        out = [f"{self._partition_key(batch_id, partition)}/_manifest.json"]
        for (other, p), chunks in sorted(self._chunks.items()):
            if p != partition or other == batch_id:
                continue
            out.extend(f"{self._partition_key(other, p)}/{object_name(*first, 'parquet')}"
                       for first in sorted(chunks) if first[0] <= end_position)
        return out

    def _partition_key(self, batch_id: str, partition: int) -> str:
        return f"{self.prefix}/batch={batch_id}/partition={partition}"

    def copy_statements(self, batch_id: str, partition: int, end_position: int) -> list[str]:
        """The COPYs of a merge: the batch's partition manifest, and the chunks of the
        partition's other open batches flushed before its end marker, by key."""
        creds = f" IAM_ROLE {quote(self.iam_role)}" if self.iam_role else ""
        manifest, *chunks = self._sources(batch_id, partition, end_position)
        out = [f"COPY staged_load FROM {quote(self.s3_root + '/' + manifest)}{creds}"
               " MANIFEST FORMAT AS PARQUET"]
        out.extend(f"COPY staged_load FROM {quote(self.s3_root + '/' + key)}{creds}"
                   " FORMAT AS PARQUET" for key in chunks)
        return out

    def _await_sources(self, batch_id: str, partition: int, end_position: int) -> None:
        """Waits (bounded, backing off) until the S3 sink has written what the merge COPYs."""
        if self._exists is None:
            return
        deadline = time.monotonic() + self.s3_wait_s
        delay = 0.05
        for key in self._sources(batch_id, partition, end_position):
            while not self._exists(key):
                if time.monotonic() >= deadline:
                    raise WarehouseError(
                        f"Redshift merge of batch {batch_id} partition {partition}: "
                        f"{self.s3_root}/{key} is not there after {self.s3_wait_s:g}s; the "
                        "S3 sink (the s3 role, with the same --s3-root, --s3-prefix and "
                        "--s3-format parquet) writes it when it closes the partition")
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)

    # -- loads ------------------------------------------------------------------------

    def stage(self, changes: ChangeSet) -> None:
        """Notes the chunk: its rows are in the S3 sink's object, COPYed at the merge."""
        if len(changes):
            first, last = chunk_bounds(changes)
            self._chunks.setdefault((changes.batch_id, changes.partition), {})[first] = last

    def drop_staged(self, partition: int) -> None:
        for key in [k for k in self._chunks if k[1] == partition]:
            del self._chunks[key]

    def _lock_partition(self, cur: psycopg.Cursor[Any], partition: int) -> None:
        self._exec(cur, "LOCK load_ledger")

    def merge(self, batch_id: str, partition: int, end_position: int) -> Any:
        self._await_sources(batch_id, partition, end_position)
        result = super().merge(batch_id, partition, end_position)
        # Everything noted of the partition up to the marker is merged (or was already).
        for key in [k for k in self._chunks if k[1] == partition]:
            chunks = self._chunks[key]
            for first in [f for f, last in chunks.items() if last[0] <= end_position]:
                del chunks[first]
            if not chunks or key == (batch_id, partition):
                del self._chunks[key]
        return result

    def _apply(self, tx: Tx, batch_id: str, partition: int,
               end_position: int) -> tuple[int, int, int]:
        cur = tx.cur  # type: ignore[attr-defined]
        merged = PgTx(cur).rows("SELECT source_position FROM merge_watermark"
                                " WHERE partition = ?", [partition])
        params = [partition, merged[0][0] if merged else positions.NONE_KEY,
                  positions.key(end_position)]
        self._exec(cur, STAGING)
        for statement in self.copy_statements(batch_id, partition, end_position):
            self._copy(cur, statement)
        self._exec(cur, COUNT_STAGED, params)
        (rows_loaded,) = cur.fetchone()
        self._exec(cur, LAST_CHANGES, params)
        self._exec(cur, DELETE_REMOVED)
        removed = cur.rowcount
        self._exec(cur, TOUCH_READDED)
        self._exec(cur, INSERT_ADDED)
        added = cur.rowcount
        for drop in DROP_STAGING:
            self._exec(cur, drop)
        return rows_loaded, added, removed

    def _copy(self, cur: psycopg.Cursor[Any], statement: str) -> None:
        """Runs one COPY from S3 (a seam: tests against PostgreSQL load the objects)."""
        self._exec(cur, statement)

    def reset_segments(self) -> None:
        # DELETE, not TRUNCATE: TRUNCATE commits at once in Redshift.
        def body(cur: psycopg.Cursor[Any]) -> None:
            for table in SEGMENT_TABLES:
                if table != "staged_changes":
                    self._exec(cur, f"DELETE FROM {table}")

        self._transaction("reset segment tables", body)
        self._chunks.clear()

    # -- batch status -------------------------------------------------------------------

    def upsert_batch_status(self, rows: list[dict[str, Any]]) -> None:
        """Delete + insert by batch_id (Redshift has no ON CONFLICT), in one transaction."""
        table = status_table(rows)
        if table.num_rows == 0:
            return
        values = []
        for row in table.to_pylist():
            values.append([row[c] if c not in TIMESTAMP_COLUMNS or row[c] is None
                           else row[c].replace(tzinfo=None) for c in STATUS_COLUMNS])
        marks = ", ".join(["%s"] * len(STATUS_COLUMNS))

        def body(cur: psycopg.Cursor[Any]) -> None:
            ids = [v[0] for v in values]
            self._exec(cur, "DELETE FROM batch_status WHERE batch_id IN ("
                       + ", ".join(["%s"] * len(ids)) + ")", ids)
            statement = (f"INSERT INTO batch_status ({', '.join(STATUS_COLUMNS)})"
                         f" VALUES ({marks})")
            if self._trace is not None:
                self._trace(statement)
            cur.executemany(statement, values)

        self._transaction("upsert batch_status", body)

    def batch_status(self, batch_id: str) -> dict[str, Any] | None:
        cols = ", ".join(
            f"CAST(EXTRACT(EPOCH FROM {c}) * 1000 AS BIGINT) AS {c}" if c in TIMESTAMP_COLUMNS
            else c for c in STATUS_COLUMNS)
        rows = self._query("read batch_status",
                           f"SELECT {cols} FROM batch_status WHERE batch_id = ?", [batch_id])
        return dict(zip(STATUS_COLUMNS, rows[0], strict=True)) if rows else None

    def members(self, segment_id: str | None = None) -> list[tuple[str, str]]:
        where, params = ("WHERE segment_id = ?", [segment_id]) if segment_id is not None \
            else ("", [])
        rows = self._query("read segment_members",
                           f"SELECT segment_id, user_id FROM segment_members {where}", params)
        return sorted(tuple(r) for r in rows)  # bytewise, as the other dialects


__all__ = ["RedshiftWarehouse", "is_transient", "pg_url", "s3_url"]

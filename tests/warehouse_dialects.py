"""Opening each warehouse dialect in tests: DuckDB on a file, PostgreSQL on a database of
the session's embedded server, and Redshift's SQL run on PostgreSQL with its COPY from S3
served from a local object store the S3 sink wrote (Redshift itself cannot run here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq

from connectors.change_set import ChangeSet
from connectors.object_store import LocalObjectStore
from connectors.s3_sink import S3Sink
from connectors.warehouses.base import LoadResult, Warehouse
from connectors.warehouses.duckdb import DuckDBWarehouse
from connectors.warehouses.postgres import PostgresWarehouse
from connectors.warehouses.redshift import RedshiftWarehouse

S3_ROOT = "s3://test-bucket/lake"
PREFIX = "audience/segment-changes"


class RedshiftOnPostgres(RedshiftWarehouse):
    """RedshiftWarehouse against PostgreSQL: an S3 sink writes beside it (the convention
    it relies on) into a local directory, and each COPY loads the objects it names."""

    def __init__(self, url: str, root: Path, partitions: int = 2, **options: Any):
        self.root = root
        self.sink = S3Sink(LocalObjectStore(root), "parquet", PREFIX)
        self.partitions = partitions
        self.statements: list[str] = []
        self.copies: list[str] = []
        super().__init__(url.replace("postgresql://", "redshift://", 1), s3_root=S3_ROOT,
                         prefix=PREFIX, iam_role="arn:aws:iam::123456789012:role/loader",
                         trace=self.statements.append, **options)

    def stage(self, changes: ChangeSet) -> None:
        self.sink.write_chunk(changes)
        super().stage(changes)

    def merge(self, batch_id: str, partition: int, end_position: int) -> LoadResult:
        # The S3 sink closes (batch, partition) before the warehouse merges it.
        self.sink.close_partition(batch_id, partition, self.partitions, end_position)
        return super().merge(batch_id, partition, end_position)

    def drop_staged(self, partition: int) -> None:
        self.sink.reset_partition(partition)  # both sinks re-read the partition
        super().drop_staged(partition)

    def _local(self, url: str) -> Path:
        if url.startswith(S3_ROOT + "/"):
            return self.root / url[len(S3_ROOT) + 1:]
        return Path(url.removeprefix("file://"))

    def _copy(self, cur: psycopg.Cursor[Any], statement: str) -> None:
        self.copies.append(statement)
        source = statement.split("'")[1]
        if " MANIFEST " in statement:
            entries = json.loads(self._local(source).read_bytes())["entries"]
            files = [self._local(e["url"]) for e in entries]
        else:
            files = [self._local(source)]
        with cur.copy("COPY staged_load FROM STDIN") as copy:
            for f in files:
                for row in pq.read_table(f).to_pylist():
                    copy.write_row(list(row.values()))


def open_dialect(dialect: str, tmp_path: Path, postgres_url: str | None,
                 **options: Any) -> Warehouse:
    if dialect == "duckdb":
        return DuckDBWarehouse(tmp_path / "warehouse.duckdb", **options)
    assert postgres_url is not None
    if dialect == "postgres":
        return PostgresWarehouse(postgres_url, **options)
    if dialect == "redshift":
        return RedshiftOnPostgres(postgres_url, tmp_path / "s3", **options)
    raise ValueError(dialect)


def member_rows(wh: Warehouse) -> list[tuple[Any, ...]]:
    """(segment, user, batch, seq) of every member, through the warehouse's own pool."""
    sql = "SELECT segment_id, user_id, batch_id, updated_seq FROM segment_members"
    rows = wh._query("rows", sql)  # type: ignore[attr-defined]  # both dialects have it
    return sorted(tuple(r) for r in rows)

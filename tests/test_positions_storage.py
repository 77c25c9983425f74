"""Wide positions through the sinks: S3 object names, columns and fold, and the warehouse
merge on DuckDB, PostgreSQL and Redshift's SQL (on PostgreSQL, parsed by sqlglot), with
values encoded and decoded as on the log; and warehouses and objects made before wide
positions (BIGINT columns, int64 object columns) read and migrated."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot

from connectors.change_sink import ChangeSink
from connectors.object_formats import decode_changes, encode_changes
from connectors.object_store import LocalObjectStore
from connectors.s3_fold import fold_objects
from connectors.s3_sink import S3Sink, parse_object_name
from connectors.warehouse_sink import WarehouseSink
from connectors.warehouses.base import LoadResult
from connectors.warehouses.duckdb import DuckDBWarehouse
from connectors.warehouses.postgres import PostgresWarehouse
from streams.api import Input, Output
from tests.test_warehouse import chunk
from tests.warehouse_dialects import RedshiftOnPostgres, open_dialect
from topics.codec import decode, encode
from topics.columns import write_columns
from topics.positions import key

Change = tuple[str, str, str, int]

# Rising along one partition, across every boundary: int64, the 20-digit names, a
# 129-digit Kinesis sequence number and beyond. As plain decimal text they do NOT sort
# (10**20 < 10**20 - 1 as text), so a merge or fold ordering by text would be wrong.
P = [2**63 - 10, 10**20 - 1, 10**20, 2**130, 2**131, 10**128 + 7, 10**200, 10**200 + 1]


def _changes(batch: str, position: int, rows: list[Change], part: int = 0) -> Input:
    value = {"batch_id": batch, "source_position": position, "part": part,
             **write_columns([r[3] for r in rows], [r[0] for r in rows], [r[1] for r in rows],
                             [r[2] for r in rows])}
    return Input("SegmentChanges", decode(encode("SegmentChanges", value))[1], 0, position, 0)


def _marker(batch: str, position: int, count: int) -> Input:
    value = {"batch_id": batch, "partition": 0, "count": count, "total": count,
             "mode": "add", "segments": ["s"], "source_position": position}
    return Input("EndMarker", decode(encode("EndMarker", value))[1], 0, position, 0)


def history() -> list[Input]:
    """A adds u and v; B removes u and closes; A adds w, removes v and closes; C re-adds v:
    members {v, w} in log order."""
    return [
        _changes("A", P[0], [("u", "s", "add", 1), ("v", "s", "add", 2)]),
        _changes("B", P[1], [("u", "s", "remove", 1)]),
        _marker("B", P[2], 1),
        _changes("A", P[3], [("w", "s", "add", 3)]),
        _changes("A", P[4], [("v", "s", "remove", 4)]),
        _marker("A", P[5], 4),
        _changes("C", P[6], [("v", "s", "add", 1)]),
        _marker("C", P[7], 1),
    ]


def _feed(sink: ChangeSink, records: list[Input]) -> list[Output]:
    return [out for record in records for out in sink.process(record)]


@pytest.mark.parametrize("fmt", ["parquet", "avro", "jsonl"])
def test_s3_objects_of_wide_positions(tmp_path: Path, fmt: str) -> None:
    store = LocalObjectStore(tmp_path)
    sink = ChangeSink(S3Sink(store, fmt), partitions=1, chunk_rows=100)
    events = _feed(sink, history())
    assert [(e.value["batch_id"], e.value["kind"]) for e in events] == [
        ("B", "sink_committed"), ("A", "sink_committed"), ("C", "sink_committed")]
    names = sorted(p.name for p in tmp_path.rglob(f"batch=A/partition=0/part-*{fmt}"))
    # Chunks are cut at every end marker of the partition: A's two, named by first stamps.
    assert names == [f"part-{key(P[0])}-00000.{fmt}", f"part-{key(P[3])}-00000.{fmt}"]
    assert names[1] == f"part-w240{2**130}-00000.{fmt}"  # 40 digits
    assert [parse_object_name(n) for n in names] == [(P[0], 0), (P[3], 0)]
    rows = decode_changes((tmp_path / next(tmp_path.rglob(names[1]))).read_bytes(), fmt)
    assert [(r["source_position"], r["user_id"], r["op"]) for r in rows] == [
        (key(P[3]), "w", "add"), (key(P[4]), "v", "remove")]
    assert fold_objects(store, "audience/segment-changes") == {("s", "v"), ("s", "w")}


def test_s3_fold_reads_objects_written_before_wide_positions(tmp_path: Path) -> None:
    """Old objects hold source_position as int64 (Parquet, Avro long, a JSON number)."""
    store = LocalObjectStore(tmp_path)
    sink = S3Sink(store, "parquet")
    new = chunk("N", 0, 10**20, [("u", "s", "remove", 1)])
    sink.write_chunk(new)
    sink.close_partition("N", 0, 1, 10**20)
    old = encode_changes(chunk("O", 0, 7, [("u", "s", "add", 1), ("v", "s", "add", 2)]),
                         "parquet")
    table = pq.read_table(io.BytesIO(old))
    as_int = table.set_column(table.schema.get_field_index("source_position"),
                              "source_position", pa.array([7, 7], pa.int64()))
    buf = io.BytesIO()
    pq.write_table(as_int, buf)
    prefix = "audience/segment-changes/batch=O/partition=0"
    store.put(f"{prefix}/part-00000000000000000007-00000.parquet", buf.getvalue())
    store.put(f"{prefix}/_manifest.json", json.dumps({"format": "parquet", "entries": [{
        "url": store.url(f"{prefix}/part-00000000000000000007-00000.parquet"),
        "meta": {"content_length": len(buf.getvalue()), "record_count": 2}}]}).encode())
    assert decode_changes(buf.getvalue(), "parquet")[0]["source_position"] == 7
    # The old add (at 7) comes before the new removal (at 10**20): v stays.
    assert fold_objects(store, "audience/segment-changes") == {("s", "v")}


@pytest.mark.parametrize("dialect", ["duckdb", "postgres", "redshift"])
def test_warehouse_merges_wide_positions_in_log_order(tmp_path: Path, postgres_url: str,
                                                      dialect: str) -> None:
    wh = open_dialect(dialect, tmp_path, postgres_url if dialect != "duckdb" else None,
                      **({"partitions": 1} if dialect == "redshift" else {}))
    try:
        sink = ChangeSink(WarehouseSink(wh), partitions=1, chunk_rows=100)
        _feed(sink, history())
        assert wh.members() == [("s", "v"), ("s", "w")]
        assert wh.watermark(0) == P[7]
        assert [(r.batch_id, r.rows_loaded, r.added, r.removed) for r in wh.ledger()] == [
            ("A", 2, 1, 1), ("B", 3, 1, 0), ("C", 1, 1, 0)]
        # A chunk re-sent below the watermark is not staged again; a merge below it is void.
        wh.stage(chunk("A", 0, P[3], [("w", "s", "remove", 9)]))
        assert wh.merge("D", 0, P[6]) == LoadResult("D", 0, 0, 0, 0, already_loaded=True)
        assert wh.members() == [("s", "v"), ("s", "w")]
        # Interleaved chunks of one range: restaging one replaces only its own rows.
        wh.stage(chunk("E", 0, 10**201, [("x", "s", "add", 1)],
                       stamps=[(10**201, 0)]))
        wh.stage(chunk("F", 0, 10**201 + 1, [("x", "s", "remove", 1)]))
        wh.stage(chunk("E", 0, 10**201, [("x", "s", "add", 1)]))
        assert wh.merge("F", 0, 10**202).rows_loaded == 2
        assert wh.members() == [("s", "v"), ("s", "w")]
        if isinstance(wh, RedshiftOnPostgres):
            for statement in wh.statements + wh.copies:
                tree = sqlglot.parse_one(statement.replace("%s", "1"), read="redshift")
                assert type(tree).__name__ != "Command" or statement == "LOCK load_ledger"
    finally:
        wh.close()


# -- warehouses made before wide positions -----------------------------------------------------

OLD_WATERMARK = """
    CREATE TABLE merge_watermark (
        partition INTEGER PRIMARY KEY,
        source_position BIGINT NOT NULL
    )"""
OLD_PG_STAGING = """
    CREATE UNLOGGED TABLE staged_changes (
        partition INTEGER NOT NULL, source_position BIGINT NOT NULL, part INTEGER NOT NULL,
        ordinal INTEGER NOT NULL, seq BIGINT NOT NULL, batch_id TEXT NOT NULL,
        user_id TEXT COLLATE "C" NOT NULL, segment_id TEXT COLLATE "C" NOT NULL,
        op TEXT NOT NULL)"""
OLD_PG_INDEX = ("CREATE INDEX staged_changes_stamp"
                " ON staged_changes (partition, source_position, part)")


def _after_upgrade(wh: Any, staged_before: int = 0) -> None:
    """Watermark 500 from before; a chunk at 400 is merged already; new ones, narrow and
    wide, merge on top (with `staged_before` rows the old code staged)."""
    assert wh.watermark(0) == 500
    wh.stage(chunk("old", 0, 400, [("z", "s", "add", 1)]))  # at or below: not staged
    wh.stage(chunk("new", 0, 600, [("v", "s", "add", 1)]))
    assert wh.merge("new", 0, 700).rows_loaded == 1 + staged_before
    wh.stage(chunk("wide", 0, 2**130, [("v", "s", "remove", 1), ("w", "s", "add", 2)]))
    assert wh.merge("wide", 0, 2**130 + 1).rows_loaded == 2
    assert wh.watermark(0) == 2**130 + 1


def test_a_duckdb_warehouse_made_before_wide_positions(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(OLD_WATERMARK)
    con.execute("INSERT INTO merge_watermark VALUES (0, 500), (1, 42)")
    con.close()
    with DuckDBWarehouse(path) as wh:
        assert wh.watermark(1) == 42
        _after_upgrade(wh)
        assert wh.members() == [("s", "w")]
    con = duckdb.connect(str(path))
    assert con.execute("SELECT data_type FROM information_schema.columns WHERE table_name ="
                       " 'merge_watermark' AND column_name = 'source_position'"
                       ).fetchall() == [("VARCHAR",)]
    assert con.execute("SELECT source_position FROM merge_watermark WHERE partition = 1"
                       ).fetchall() == [("00000000000000000042",)]
    con.close()


def _old_postgres(url: str, staging: bool) -> None:
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(OLD_WATERMARK)
        con.execute("INSERT INTO merge_watermark VALUES (0, 500)")
        if staging:
            con.execute(OLD_PG_STAGING)
            con.execute(OLD_PG_INDEX)
            # Staged by the old code before the upgrade (open batch), merged by the new.
            con.execute("INSERT INTO staged_changes VALUES (0, 550, 0, 0, 1, 'open', 'u',"
                        " 's', 'add')")


def _column_type(url: str, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as con:
        return con.execute(
            "SELECT data_type, collation_name FROM information_schema.columns"
            " WHERE table_name = %s AND column_name = 'source_position'", [table]).fetchall()


def test_a_postgres_warehouse_made_before_wide_positions(postgres_url: str) -> None:
    _old_postgres(postgres_url, staging=True)
    with PostgresWarehouse(postgres_url) as wh:
        _after_upgrade(wh, staged_before=1)
        assert wh.members() == [("s", "u"), ("s", "w")]  # u: staged before the upgrade
    assert _column_type(postgres_url, "merge_watermark") == [("text", "C")]
    assert _column_type(postgres_url, "staged_changes") == [("text", "C")]


def test_a_redshift_warehouse_made_before_wide_positions(tmp_path: Path,
                                                         postgres_url: str) -> None:
    _old_postgres(postgres_url, staging=False)
    wh = RedshiftOnPostgres(postgres_url, tmp_path / "s3", partitions=1)
    try:
        migration = [s for s in wh.statements if s.startswith(("ALTER", "UPDATE"))]
        assert migration == [
            "ALTER TABLE merge_watermark ADD COLUMN source_position_key VARCHAR(256)"
            " DEFAULT ''",
            "UPDATE merge_watermark SET source_position_key ="
            " LPAD(CAST(source_position AS VARCHAR), 20, '0')",
            "ALTER TABLE merge_watermark DROP COLUMN source_position",
            "ALTER TABLE merge_watermark RENAME COLUMN source_position_key TO source_position"]
        for statement in migration:
            assert type(sqlglot.parse_one(statement, read="redshift")).__name__ != "Command"
        _after_upgrade(wh)
        assert wh.members() == [("s", "w")]
    finally:
        wh.close()
    assert _column_type(postgres_url, "merge_watermark")[0][0] == "character varying"
    # Opened again: nothing left to migrate.
    again = RedshiftOnPostgres(postgres_url, tmp_path / "s3", partitions=1)
    try:
        assert not [s for s in again.statements if s.startswith(("ALTER", "UPDATE"))]
        assert again.watermark(0) == 2**130 + 1
    finally:
        again.close()

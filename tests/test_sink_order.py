"""The change sink, its writers and its task against the exactly-once holes of the sink side:
replace removals that span chunks, a commit stamp ahead of its position, and batches
interleaved on one partition (the warehouse merges in log order)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.change_sink import ChangeSink
from connectors.object_store import LocalObjectStore
from connectors.s3_fold import fold_objects
from connectors.s3_sink import S3Sink
from connectors.warehouse_sink import WarehouseSink
from connectors.warehouses.duckdb import DuckDBWarehouse
from streams.api import Input, Output
from streams.outputs import OutputWriter
from streams.sink_task import SinkTask
from topics.backends.embedded.log import EmbeddedLog
from topics.codec import decode, encode
from topics.columns import write_columns
from topics.spec import CHANGES, EVENTS, SPECS

Change = tuple[str, str, str, int]  # (user_id, segment_id, op, seq)


def changes(batch: str, source_position: int, rows: list[Change], part: int = 0,
            partition: int = 0) -> Input:
    value = {"batch_id": batch, "source_position": source_position, "part": part,
             **write_columns([r[3] for r in rows], [r[0] for r in rows], [r[1] for r in rows],
                             [r[2] for r in rows])}
    return Input("SegmentChanges", value, partition, source_position, 0)


def marker(batch: str, source_position: int, count: int, partition: int = 0,
           mode: str = "add", segments: tuple[str, ...] = ()) -> Input:
    value = {"batch_id": batch, "partition": partition, "count": count, "total": count,
             "mode": mode, "segments": list(segments), "source_position": source_position}
    return Input("EndMarker", value, partition, source_position, 0)


def feed(sink: ChangeSink, records: list[Input]) -> list[Output]:
    out: list[Output] = []
    for record in records:
        out += sink.process(record)
    return out


def kinds(events: list[Output]) -> list[tuple[str, str, int]]:
    return [(e.value["batch_id"], e.value["kind"], e.value["partition"]) for e in events]


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[DuckDBWarehouse]:
    with DuckDBWarehouse(tmp_path / "warehouse.duckdb") as wh:
        yield wh


def manifest(root: Path, batch: str) -> dict[str, Any]:
    path = root / "audience" / "segment-changes" / f"batch={batch}" / "manifest.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


# -- 1. replace removals that span sink chunks ------------------------------------------------

USERS = [f"user-{i:02d}" for i in range(23)]


def replace_history() -> list[Input]:
    """b1 adds 23 users; b2 (replace, listing user-00) removes the other 22 at its end
    marker, in parts of 5 that all carry the marker's source position."""
    out = [changes("b1", 10 + i, [(u, "s", "add", i + 1)]) for i, u in enumerate(USERS)]
    out.append(marker("b1", 40, len(USERS)))
    removed = USERS[1:]
    for part, start in enumerate(range(0, len(removed), 5)):
        out.append(changes("b2", 60, [(u, "s", "remove", -1) for u in removed[start:start + 5]],
                           part=part))
    out.append(marker("b2", 60, len(removed), mode="replace", segments=("s",)))
    return out


def test_replace_removals_spanning_sink_chunks_are_all_kept_in_s3(tmp_path: Path) -> None:
    """Regression: chunks were named by the source position of their first change alone, so
    the removals of one end marker past --chunk-rows reused one key: the later chunks
    overwrote the earlier ones and the objects lost most removals."""
    root = tmp_path / "s3"
    sink = ChangeSink(S3Sink(LocalObjectStore(root), "jsonl"), partitions=1, chunk_rows=7)
    events = feed(sink, replace_history())
    assert kinds(events) == [("b1", "sink_committed", 0), ("b2", "sink_committed", 0)]
    listed = manifest(root, "b2")
    assert listed["record_count"] == 22
    # Chunks of 7 rows or more, of whole messages: parts 0-1, 2-3 and 4.
    assert sorted(p.name for p in root.rglob("batch=b2/partition=0/part-*")) == [
        f"part-{60:020d}-{part:05d}.jsonl" for part in (0, 2, 4)]
    assert fold_objects(LocalObjectStore(root), "audience/segment-changes") == {("s", "user-00")}


def test_replace_removals_spanning_sink_chunks_are_all_kept_in_the_warehouse(
        warehouse: DuckDBWarehouse) -> None:
    """Regression: the warehouse staged a chunk under (load, first source position), so the
    later chunks of one end marker's removals replaced the earlier ones in staging: a replace
    far larger than a chunk left most of the members it should have removed."""
    sink = ChangeSink(WarehouseSink(warehouse), partitions=1, chunk_rows=7)
    events = feed(sink, replace_history())
    assert kinds(events) == [("b1", "sink_committed", 0), ("b2", "sink_committed", 0)]
    assert warehouse.members() == [("s", "user-00")]


# -- 3. batches interleaved on one partition ---------------------------------------------------


def test_interleaved_batches_merge_in_log_order(warehouse: DuckDBWarehouse) -> None:
    """Regression: the warehouse merged each (batch, partition) at its own end marker, so
    with batch A adding u, then batch B removing u, and B's end marker before A's, the
    warehouse applied the removal first and kept (s, u), which the log's fold does not."""
    sink = ChangeSink(WarehouseSink(warehouse), partitions=1, chunk_rows=100)
    events = feed(sink, [
        changes("A", 10, [("u", "s", "add", 1), ("v", "s", "add", 2)]),
        changes("B", 20, [("u", "s", "remove", 1)]),
        marker("B", 30, 1),
        changes("A", 35, [("w", "s", "add", 3)]),
        marker("A", 40, 3),
    ])
    assert kinds(events) == [("B", "sink_committed", 0), ("A", "sink_committed", 0)]
    assert warehouse.members() == [("s", "v"), ("s", "w")]


# -- 2. the stamp committed with a position ----------------------------------------------------


def test_sink_commits_the_stamp_as_of_its_committed_position(tmp_path: Path) -> None:
    """Regression: a sink stored the highest stamp seen in a poll beside the position it
    committed, and that stamp could come from after the position (here the first message
    of batch b2, in the same poll as b1's end marker). A restarted sink then skipped that
    message as a duplicate, and b2 failed on a count mismatch."""
    log = EmbeddedLog(tmp_path / "log")
    log.ensure_topics([SPECS[CHANGES], SPECS[EVENTS]])
    producer = log.producer()
    for record in [changes("b1", 10, [("u1", "s", "add", 1), ("u2", "s", "add", 2)]),
                   marker("b1", 11, 2),
                   changes("b2", 20, [("u3", "s", "add", 1)]),
                   changes("b2", 21, [("u4", "s", "add", 2)]),
                   marker("b2", 22, 2)]:
        producer.send(CHANGES, 0, encode(record.schema, record.value))
    producer.flush()
    store = LocalObjectStore(tmp_path / "s3")

    def task(member: str) -> SinkTask:
        return SinkTask(log, ChangeSink(S3Sink(store, "jsonl"), partitions=1),
                        OutputWriter(log, producer), "sink-s3", member)

    first = task("m1")
    for _round in range(100):  # bounded: the first polls may only join the group
        if first.step(max_messages=3, timeout_s=0.01):
            break
    else:
        raise AssertionError("the first sink read nothing")
    first.close()  # it stops after b2's first message: b1 committed, b2 open
    second = task("m2")
    idle = 0
    for _round in range(200):
        idle = 0 if second.step(timeout_s=0.01) else idle + 1
        if idle >= 3 and second.consumer.assignment():
            break
    second.close()
    events = [decode(m.value)[1] for p in log.partitions(EVENTS) for m in log.read(EVENTS, p)]
    done = {(e["batch_id"], e["kind"]): e for e in events}
    assert set(done) == {("b1", "sink_committed"), ("b2", "sink_committed")}, events
    assert done[("b2", "sink_committed")]["changes"] == 2
    log.close()

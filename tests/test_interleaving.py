"""Property: batches interleaved on the log, through the real tasks, end in one membership.

Several batches (add, remove and replace modes; overlapping users and segments) are written
straight to an embedded log as the importer writes them (AudienceRows messages per
partition, then an EndMarker per partition), interleaved at random on each partition, some
rows messages lost (their batch fails there on the count). Then the real ProcessorTask
(AudienceSegments) and the SinkTasks of both sinks (S3 objects in a LocalObjectStore, the
DuckDB warehouse), with chunks of a few rows, run in-process, stepped in random order with
random poll sizes, the sinks sometimes restarted. At the end:

    warehouse members == fold of the S3 objects == the processor's members tables
                      == an independent model folding each partition's log in order.
"""

from __future__ import annotations

import random
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.change_sink import ChangeSink
from connectors.object_store import LocalObjectStore
from connectors.s3_fold import fold_objects
from connectors.s3_sink import S3Sink
from connectors.warehouse_sink import WarehouseSink
from connectors.warehouses.duckdb import DuckDBWarehouse
from processors.segments import AudienceSegments
from streams.outputs import OutputWriter
from streams.processor_task import ProcessorTask
from streams.sink_task import SinkTask
from topics.backends.embedded.log import EmbeddedLog
from topics.codec import encode
from topics.columns import write_columns
from topics.log import Log
from topics.partitioner import partition_for
from topics.spec import ROWS, SPECS

PARTITIONS = SPECS[ROWS].partitions
USERS = [f"user-{i}" for i in range(8)]
SEGMENTS = ["seg-a", "seg-b", "seg-c"]
PREFIX = "audience/segment-changes"
Row = tuple[str, str, str]  # (user_id, segment_id, op)
Member = tuple[str, str]  # (segment_id, user_id)


@dataclass(frozen=True)
class Batch:
    batch_id: str
    mode: str
    rows: list[Row]


@dataclass(frozen=True)
class Item:
    """One message of a partition of the rows topic, as written."""

    batch: Batch
    rows: list[tuple[int, str, str, str]] | None  # (seq, user, segment, op); None: end marker
    count: int = 0  # an end marker's: rows of its batch in this partition, lost ones too


row_st = st.tuples(st.sampled_from(USERS), st.sampled_from(SEGMENTS),
                   st.sampled_from(["add", "add", "remove"]))
batch_st = st.tuples(st.sampled_from(["add", "remove", "replace"]),
                     st.lists(row_st, min_size=1, max_size=14))


@st.composite
def histories(draw: st.DrawFn) -> dict[int, list[Item]]:
    """Per partition, the messages of 2-4 batches interleaved at random, each batch's own
    in order (rows messages of 1-3 rows, then its end marker); a message sometimes lost."""
    batches = [Batch(f"b{i}", mode, rows)
               for i, (mode, rows) in enumerate(draw(st.lists(batch_st, min_size=2,
                                                              max_size=4)))]
    logs: dict[int, list[Item]] = {}
    for p in range(PARTITIONS):
        queues: dict[str, list[Item]] = {}
        for batch in batches:
            mine = [(seq, u, s, op) for seq, (u, s, op) in enumerate(batch.rows, start=1)
                    if partition_for(u, PARTITIONS) == p]
            k = draw(st.integers(1, 3))
            messages = [Item(batch, mine[i:i + k]) for i in range(0, len(mine), k)]
            if messages and draw(st.integers(0, 9)) == 0:
                messages.pop(draw(st.integers(0, len(messages) - 1)))  # lost: detected loss
            queues[batch.batch_id] = [*messages, Item(batch, None, len(mine))]
        log: list[Item] = []
        while queues:
            batch_id = draw(st.sampled_from(sorted(queues)))
            log.append(queues[batch_id].pop(0))
            if not queues[batch_id]:
                del queues[batch_id]
        logs[p] = log
    return logs


def write(log: Log, logs: dict[int, list[Item]]) -> None:
    """As the importer writes them (connectors/importer.py)."""
    producer = log.producer()
    for p, items in logs.items():
        for item in items:
            b = item.batch
            if item.rows is None:
                segments = sorted({s for _u, s, _o in b.rows})
                value = encode("EndMarker", {"batch_id": b.batch_id, "partition": p,
                                             "count": item.count, "total": len(b.rows),
                                             "mode": b.mode, "segments": segments})
            else:
                value = encode("AudienceRows", {
                    "batch_id": b.batch_id, "mode": b.mode, "attributes": None,
                    **write_columns([r[0] for r in item.rows], [r[1] for r in item.rows],
                                    [r[2] for r in item.rows], [r[3] for r in item.rows])})
            producer.send(ROWS, p, value)
    producer.flush()


def model(logs: dict[int, list[Item]]) -> set[Member]:
    """Each partition's log folded in order: an add of a non-member makes it a member of
    the adding batch, a replace batch's add re-affirms a member for it, a remove drops it;
    a replace end marker whose count matches drops the members of the segments it names
    that no row of that batch added or re-affirmed since."""
    members: set[Member] = set()
    for items in logs.values():
        owner: dict[Member, str] = {}
        applied: dict[str, int] = defaultdict(int)
        for item in items:
            b = item.batch
            if item.rows is not None:
                for _seq, user, segment, op in item.rows:
                    applied[b.batch_id] += 1
                    key = (segment, user)
                    if op == "remove":
                        owner.pop(key, None)
                    elif key not in owner or b.mode == "replace":
                        owner[key] = b.batch_id
            elif b.mode == "replace" and applied[b.batch_id] == item.count:
                named = {s for _u, s, _o in b.rows}
                owner = {k: o for k, o in owner.items() if k[0] not in named or o == b.batch_id}
        members |= set(owner)
    return members


class Sinks:
    """The two sink tasks of a worker, each restartable (a warehouse restart reopens the
    database: its TEMP staging is gone, as after a crash)."""

    def __init__(self, log: Log, root: Path, fmt: str, chunk_rows: int):
        self.log, self.root, self.fmt, self.chunk_rows = log, root, fmt, chunk_rows
        self.store = LocalObjectStore(root / "s3")
        self.warehouse = DuckDBWarehouse(root / "warehouse.duckdb", threads=1)
        self.tasks = [self._s3(), self._warehouse()]

    def _outputs(self) -> OutputWriter:
        return OutputWriter(self.log, self.log.producer())

    def _s3(self) -> SinkTask:
        sink = ChangeSink(S3Sink(self.store, self.fmt, PREFIX), PARTITIONS, self.chunk_rows)
        return SinkTask(self.log, sink, self._outputs(), "sink-s3", "m")

    def _warehouse(self) -> SinkTask:
        sink = ChangeSink(WarehouseSink(self.warehouse), PARTITIONS, self.chunk_rows)
        return SinkTask(self.log, sink, self._outputs(), "sink-warehouse", "m")

    def restart(self, which: int) -> None:
        self.tasks[which].close()
        if which == 0:
            self.tasks[0] = self._s3()
        else:
            self.warehouse.close()
            self.warehouse = DuckDBWarehouse(self.root / "warehouse.duckdb", threads=1)
            self.tasks[1] = self._warehouse()

    def close(self) -> None:
        for task in self.tasks:
            task.close()
        self.warehouse.close()


@contextmanager
def pipeline(root: Path, logs: dict[int, list[Item]], fmt: str, chunk_rows: int
             ) -> Iterator[tuple[EmbeddedLog, ProcessorTask, Sinks]]:
    log = EmbeddedLog(root / "log")
    log.ensure_topics(list(SPECS.values()))
    write(log, logs)
    processor = ProcessorTask(log, AudienceSegments(), OutputWriter(log, log.producer()),
                              "processor-segments", "m", checkpoint_interval_s=0.0,
                              checkpoint_messages=4)
    sinks = Sinks(log, root, fmt, chunk_rows)
    try:
        yield log, processor, sinks
    finally:
        sinks.close()
        processor.close()
        log.close()


def run_to_the_end(log: Log, processor: ProcessorTask, sinks: Sinks, rng: random.Random,
                   restarts: int) -> None:
    """Steps the tasks in random order with random poll sizes until every group has read
    everything and a whole round read nothing; restarts sinks along the way."""
    groups = ("processor-segments", "sink-s3", "sink-warehouse")
    for _round in range(2_000):  # bounded: a few dozen messages per partition
        if restarts and rng.random() < 0.1:
            restarts -= 1
            sinks.restart(rng.randrange(2))
        tasks = [processor, *sinks.tasks]
        rng.shuffle(tasks)
        read = sum(task.step(max_messages=rng.randint(1, 6), timeout_s=0.0) for task in tasks)
        if not read and all(task.consumer.assignment() for task in tasks) and not any(
                gp.lag for g in groups for gp in log.group_positions(g)):
            return
    raise AssertionError("the tasks did not catch up")


def members_of(processor: ProcessorTask) -> set[Member]:
    return {(segment, user) for user, memberships in processor.tables("members").items()
            for segment, _batch in memberships}


# Each example is a fresh log and warehouse and ~100 task steps: ~0.3 s.
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(logs=histories(), fmt=st.sampled_from(["parquet", "avro", "jsonl"]),
       chunk_rows=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       restarts=st.integers(0, 2))
def test_interleaved_batches_end_in_one_membership_everywhere(
        logs: dict[int, list[Item]], fmt: str, chunk_rows: int, seed: int,
        restarts: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            pipeline(Path(tmp), logs, fmt, chunk_rows) as (log, processor, sinks):
        run_to_the_end(log, processor, sinks, random.Random(seed), restarts)
        expected = model(logs)
        assert members_of(processor) == expected
        assert set(sinks.warehouse.members()) == expected
        assert fold_objects(sinks.store, PREFIX) == expected

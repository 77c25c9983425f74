"""Reads a processor's table from outside its workers (status queries, the importer's
duplicate check, `streams verify`): restore each partition (snapshot + changelog), then fold
the inputs that came after the stamp. Pure folds make this safe: outputs are discarded,
and a message that raises is skipped as its worker skips it (its writes rolled back)."""

from __future__ import annotations

from typing import Any

from streams.api import Input, Processor
from streams.state.recovery import restore
from streams.state.snapshots import SnapshotStore
from streams.state.store import PartitionStore
from topics.codec import decode
from topics.log import Log


def read_table(log: Log, processor: Processor, table: str,
               snapshots: SnapshotStore | None = None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for partition in log.partitions(processor.input_topic):
        store, _tail = restore(log, processor.changelog_topic, partition, processor.tables,
                               snapshots)
        fold_after(log, processor, partition, store)
        merged.update(store.data[table])
    return merged


def fold_after(log: Log, processor: Processor, partition: int, store: PartitionStore) -> int:
    """Folds the inputs after the store's stamp into it, as a worker would (a message that
    raises is rolled back); returns how many."""
    folded = 0
    for msg in log.read(processor.input_topic, partition, after=store.applied):
        schema, value = decode(msg.value)
        store.begin()
        try:
            processor.process(store.views, Input(schema, value, partition, msg.position,
                                                 msg.timestamp_ms))
        except Exception:
            store.rollback()
        else:
            store.commit()
        store.applied = msg.position
        folded += 1
    return folded

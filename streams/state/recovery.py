"""Rebuilds a partition's store from its changelog before the partition takes input."""

from __future__ import annotations

from typing import Any

from streams.api import TableSpec
from streams.state.changelog import read_changes
from streams.state.store import PartitionStore
from topics.log import Log


def restore(log: Log, changelog_topic: str, partition: int,
            specs: tuple[TableSpec[Any], ...]) -> PartitionStore:
    store = PartitionStore(specs)
    for table, applied, keys, values in read_changes(log, changelog_topic, partition):
        if table not in store.specs:
            raise ValueError(f"{changelog_topic}[{partition}] has entries for unknown table "
                             f"{table!r}; expected one of {sorted(store.specs)}")
        for key, value in zip(keys, values, strict=True):
            store.load(table, key, value)
        store.applied = applied if store.applied is None else max(store.applied, applied)
    return store

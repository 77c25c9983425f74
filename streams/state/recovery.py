"""Rebuilds a partition's store before the partition takes input: the newest valid
snapshot, then the whole checkpoints of the changelog after it (changelog.py says which
are valid). An owner then claims the partition (`claim`): later writes of older owners
are void from the claim on."""

from __future__ import annotations

import logging
from typing import Any

from streams.api import TableSpec
from streams.state.changelog import (
    CLAIM,
    ENTRY,
    FENCE,
    UNCHAINED,
    Tail,
    read_checkpoints,
    scan_claims,
    write_claim,
)
from streams.state.snapshots import Snapshot, SnapshotStore
from streams.state.store import PartitionStore
from topics.log import Log, Producer

log_ = logging.getLogger(__name__)


class HistoryLost(Exception):
    """The changelog no longer holds the start of the history and no snapshot covers it."""


def restore(log: Log, changelog_topic: str, partition: int,
            specs: tuple[TableSpec[Any], ...],
            snapshots: SnapshotStore | None = None) -> tuple[PartitionStore, Tail]:
    for snapshot in (snapshots.candidates(changelog_topic, partition) if snapshots else []):
        store, tail = _from_snapshot(snapshot, specs)
        _apply(log, changelog_topic, partition, store, tail, after=snapshot.covers)
        if any(f <= (snapshot.applied if snapshot.applied is not None else -1)
               and p > snapshot.covers for p, f, _e in tail.fences):
            continue  # a replay after it rewinds inputs it covers: take an older one
        return store, tail
    store, tail = PartitionStore(specs), Tail()
    _apply(log, changelog_topic, partition, store, tail, after=None)
    if _expired(tail) or (tail.first_schema != FENCE and log.truncated(changelog_topic,
                                                                       partition)):
        raise HistoryLost(
            f"{changelog_topic}[{partition}]: the changelog no longer starts at the "
            "beginning of its history (it expired) and no snapshot covers what is gone; "
            "bring the snapshots back, or replay from earliest")
    return store, tail


def _expired(tail: Tail) -> bool:
    """Every owner claims before it writes, and the first claim is generation 1, so a
    changelog read from its start begins with that claim (or with a fence, or with an
    entry of a writer from before claims, generation 0). Anything else: its head expired."""
    if tail.first_schema == CLAIM:
        return tail.first_generation != 1
    return tail.first_schema == ENTRY and tail.first_generation != 0


def _from_snapshot(snapshot: Snapshot, specs: tuple[TableSpec[Any], ...]
                   ) -> tuple[PartitionStore, Tail]:
    store = PartitionStore(specs)
    for table, entries in snapshot.tables.items():
        if table not in store.specs:
            raise ValueError(f"a snapshot holds unknown table {table!r}; expected one of "
                             f"{sorted(store.specs)}")
        for key, encoded in entries:
            store.load(table, key, encoded)
    store.applied = store.checkpointed = snapshot.applied
    tail = Tail(floor=snapshot.floor, generation=max(snapshot.generation, snapshot.floor),
                epoch=snapshot.epoch, last_position=snapshot.covers, first_schema="snapshot")
    return store, tail


def _apply(log: Log, topic: str, partition: int, store: PartitionStore, tail: Tail,
           after: int | None) -> None:
    for checkpoint in read_checkpoints(log, topic, partition, after, tail):
        expected = -1 if store.checkpointed is None else store.checkpointed
        if checkpoint.previous not in (UNCHAINED, expected):
            raise HistoryLost(
                f"{topic}[{partition}]: the checkpoint at input {checkpoint.applied} follows "
                f"the one at {checkpoint.previous}, but the history read holds {expected}: "
                "changelog messages between them expired before a snapshot covered them; "
                "bring the snapshots back, or replay from earliest")
        for table, keys, values in checkpoint.tables:
            if table not in store.specs:
                raise ValueError(f"{topic}[{partition}] has entries for unknown table "
                                 f"{table!r}; expected one of {sorted(store.specs)}")
            for key, value in zip(keys, values, strict=True):
                store.load(table, key, value)
        if store.applied is None or checkpoint.applied > store.applied:
            store.applied = checkpoint.applied
        store.checkpointed = checkpoint.applied
    if tail.torn:
        log_.warning("%s[%s]: discarded %d torn checkpoint(s) (their inputs are reprocessed)",
                     topic, partition, tail.torn)
    store.epoch = tail.epoch


def claim(log: Log, producer: Producer, changelog_topic: str, partition: int,
          store: PartitionStore, tail: Tail, member: str) -> None:
    """Makes this worker the partition's writer: a claim of a new generation goes to the
    changelog, and what older owners wrote before it (after the restore's read) is applied
    too, so the store is exactly the log up to the claim."""
    generation = tail.generation + 1
    write_claim(producer, changelog_topic, partition, generation, member)
    producer.flush()
    _apply(log, changelog_topic, partition, store, tail, after=tail.last_position)
    if not any(g == generation and m == member for _p, g, m in tail.claims):
        raise RuntimeError(f"{changelog_topic}[{partition}]: the claim of generation "
                           f"{generation} by {member} was not read back")
    store.generation = generation


def newer_claim(log: Log, changelog_topic: str, partition: int, store: PartitionStore,
                tail: Tail) -> bool:
    """Reads the changelog after `tail` to its end (the owner's own checkpoints, mostly):
    True if another owner claimed the partition meanwhile (this one is a zombie)."""
    seen = len(tail.claims)
    scan_claims(log, changelog_topic, partition, tail)
    return any(g > store.generation for _p, g, _m in tail.claims[seen:])

"""Runs one processor over the partitions of its input topic that this worker owns.

Per partition: restore the store (snapshot + changelog), claim the partition in its
changelog (a new owner generation: a zombie's later writes are void), resume after the
stamp, fold the rest. Each input message is one transaction on the store: a message that
raises leaves no trace in the tables; it goes to the dead-letter topic and the processor
says what that means for its domain (`on_error`).

A checkpoint makes progress durable in a fixed order, each step only after the one
before is durable:
  1. outputs (flushed), 2. changelog (one whole checkpoint per partition, stamped with the
  last applied input and the generation), 3. offsets; then, now and then, a snapshot.
A crash between 1 and 2 re-emits outputs (sinks skip them by their source stamps); a crash
between 2 and 3 re-reads inputs that the stamp then skips. Nothing is applied twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streams import metrics
from streams.api import Input, Output, Processor
from streams.faults import crash_armed, crash_point
from streams.outputs import OutputWriter
from streams.state.changelog import Tail, write_checkpoint
from streams.state.recovery import claim, newer_claim, restore
from streams.state.snapshots import Snapshot, SnapshotStore
from streams.state.store import PartitionStore
from topics.codec import decode
from topics.log import Log, Message, TopicPartition
from topics.spec import DEAD_LETTER

log_ = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotPolicy:
    every_bytes: int = 64 << 20  # changelog bytes written for a partition
    every_s: float = 3600.0  # or this long since the last, if anything changed
    idle_bytes: int = 1 << 20  # or this many, once the input is drained


@dataclass
class _Owned:
    store: PartitionStore
    tail: Tail  # the changelog as read so far (for the next snapshot)
    written: int = 0  # changelog bytes since the last snapshot
    last_snapshot: float = 0.0  # monotonic
    covered: bool = False  # a snapshot covers its history (the one restored, or a newer)


class ProcessorTask:
    def __init__(self, log: Log, processor: Processor, outputs: OutputWriter, group: str,
                 member: str = "", checkpoint_interval_s: float = 1.0,
                 checkpoint_messages: int = 32, snapshots: SnapshotStore | None = None,
                 snapshot_policy: SnapshotPolicy = SnapshotPolicy()):
        self.log = log
        self.processor = processor
        self.outputs = outputs
        self.name = processor.name
        self.member = member or f"{processor.name}-{id(self):x}"
        self.snapshots = snapshots
        self.snapshot_policy = snapshot_policy
        self._owned: dict[int, _Owned] = {}
        self._uncommitted: dict[TopicPartition, int] = {}
        self._since_checkpoint = 0
        self._checkpoint_interval_s = checkpoint_interval_s
        self._checkpoint_messages = checkpoint_messages
        self._next_checkpoint = time.monotonic() + checkpoint_interval_s
        self._between = f"{self.name}.between_outputs"  # e.g. a replace's removal parts
        self.consumer = log.consumer(group, [processor.input_topic], self, member)

    @property
    def stores(self) -> dict[int, PartitionStore]:
        return {p: owned.store for p, owned in self._owned.items()}

    # -- rebalance ------------------------------------------------------------------------
    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        with metrics.restoring():  # not ready (/readyz) while a partition is restored
            self._assign(tps)

    def _assign(self, tps: Sequence[TopicPartition]) -> None:
        topic = self.processor.changelog_topic
        for tp in tps:
            started = time.monotonic()
            store, tail = restore(self.log, topic, tp.partition, self.processor.tables,
                                  self.snapshots)
            claim(self.log, self.outputs.producer, topic, tp.partition, store, tail,
                  self.member)
            self._owned[tp.partition] = _Owned(store, tail, last_snapshot=time.monotonic(),
                                               covered=tail.first_schema == "snapshot")
            committed = self.consumer.committed(tp)
            if store.applied is not None and (committed is None or committed > store.applied):
                # The changelog's stamp is what was applied; a commit beyond it (inputs that
                # changed nothing, or a zombie's late commit) must not skip inputs.
                self.consumer.seek_after(tp, store.applied)
            elif store.applied is None and committed is not None:
                self.consumer.seek_after(tp, None)
            took = time.monotonic() - started
            metrics.on_restore(self.name, tp.partition, took,
                               sum(len(data) for data in store.data.values()))
            log_.info("%s: restored %s (applied up to %s, generation %d) in %.2fs", self.name,
                      tp, store.applied, store.generation, took,
                      extra={"task": self.name, "partition": tp.partition,
                             "member": self.member})

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        self.checkpoint()
        if self.snapshots is not None:
            # Given back cleanly (a stop, a rebalance): a snapshot of what the changelog got
            # since the last one, so that no restore, however much later, needs that tail
            # (the changelog's retention may drop it before a worker runs again).
            for tp in tps:
                owned = self._owned.get(tp.partition)
                if owned is not None and (owned.written or not owned.covered):
                    self._snapshot(tp.partition, owned)
        self._drop(tps)

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        """Taken away without a clean revoke (session expired): nothing of these partitions
        may become durable from here, so their state is dropped unwritten."""
        log_.warning("%s: lost %s; dropping their state without a checkpoint", self.name,
                     ", ".join(map(str, tps)), extra={"task": self.name, "member": self.member})
        self._drop(tps)

    def _drop(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self._owned.pop(tp.partition, None)
            self._uncommitted.pop(tp, None)

    # -- processing -----------------------------------------------------------------------
    def step(self, max_messages: int = 32, timeout_s: float = 0.05) -> int:
        """Processes what is available (waiting at most `timeout_s`); returns messages seen."""
        messages = self.consumer.poll(max_messages, timeout_s)
        process, send = self.processor.process, self.outputs.send
        for msg in messages:
            owned = self._owned.get(msg.partition)
            if owned is None:
                continue  # lost while this poll's messages were in hand
            store = owned.store
            if store.applied is not None and msg.position <= store.applied:
                # Applied before a crash: the changelog holds its effect; only the offset
                # commit is missing.
                self._uncommitted[msg.tp] = msg.position
                continue
            schema, value = decode(msg.value)
            record = Input(schema, value, msg.partition, msg.position, msg.timestamp_ms)
            metrics.on_message(self.name, msg.topic, msg.partition, schema, value)
            store.begin()
            try:
                outputs = process(store.views, record)
            except Exception as exc:  # a poison message: nothing of it is kept
                store.rollback()
                outputs = self._poison(msg, record, exc)
            else:
                store.commit()
            for i, out in enumerate(outputs):
                send(out, store.epoch)
                if i == 0 and len(outputs) > 1 and crash_armed(self._between):
                    self.outputs.flush()  # the first output durable, the others not
                    crash_point(self._between)
            store.applied = msg.position
            self._uncommitted[msg.tp] = msg.position
        self._since_checkpoint += len(messages)
        if (not messages  # idle: make what is done visible downstream now
                or self._since_checkpoint >= self._checkpoint_messages
                or time.monotonic() >= self._next_checkpoint):
            self.checkpoint()
            if not messages:
                self._snapshot_due(idle=True)
        return len(messages)

    def _poison(self, msg: Message, record: Input, exc: Exception) -> list[Output]:
        error = f"{self.name} failed on {msg.tp}@{msg.position}: {type(exc).__name__}: {exc}"
        log_.error("%s; the message goes to %s and its writes are dropped", error, DEAD_LETTER,
                   extra={"task": self.name, "partition": msg.partition, "member": self.member,
                          "batch_id": str(record.value.get("batch_id", ""))})
        dead = Output(DEAD_LETTER, "DeadLetter", {
            "batch_id": str(record.value.get("batch_id", "")),
            "file": f"{msg.tp}@{msg.position}", "row": -1, "reason": error,
            "raw": f"{record.schema} value of {len(msg.value)} bytes"}, partition=0)
        on_error = getattr(self.processor, "on_error", None)
        return [dead, *(on_error(record, error) if on_error is not None else [])]

    def checkpoint(self) -> None:
        self._since_checkpoint = 0
        self._next_checkpoint = time.monotonic() + self._checkpoint_interval_s
        if not self._uncommitted:
            return
        started = time.monotonic()
        self._checkpoint()
        metrics.on_checkpoint(self.name, time.monotonic() - started)
        self._snapshot_due()  # timed apart: a snapshot is no part of the checkpoint

    def _checkpoint(self) -> None:
        self.outputs.flush()  # 1. outputs
        crash_point(f"{self.name}.after_outputs")
        producer = self.outputs.producer
        topic = self.processor.changelog_topic
        for partition, owned in self._owned.items():
            store = owned.store
            changes = store.take_dirty()
            if changes and store.applied is not None:
                owned.written += write_checkpoint(producer, topic, partition, store.applied,
                                                  store.generation, changes, self.name,
                                                  store.checkpointed)
                store.checkpointed = store.applied
        producer.flush()  # 2. changelog
        crash_point(f"{self.name}.after_changelog")
        committed, self._uncommitted = self._uncommitted, {}
        self.consumer.commit(committed)  # 3. offsets

    # -- snapshots ------------------------------------------------------------------------
    def _snapshot_due(self, idle: bool = False) -> None:
        """Snapshots partitions whose changelog grew `every_bytes` or that changed and were
        last snapshotted `every_s` ago; when the input is drained (`idle`), already after
        `idle_bytes`: the worker has nothing better to do, and the next stop, or the
        next restore, then finds little or no tail (in `streams run` this overlaps with the
        sinks finishing in the other process)."""
        if self.snapshots is None:
            return
        now = time.monotonic()
        policy = self.snapshot_policy
        enough = policy.idle_bytes if idle else policy.every_bytes
        for partition, owned in list(self._owned.items()):
            if owned.written and (owned.written >= enough
                                  or now - owned.last_snapshot >= policy.every_s):
                self._snapshot(partition, owned)
                owned.written, owned.last_snapshot = 0, now

    def _snapshot(self, partition: int, owned: _Owned) -> None:
        topic = self.processor.changelog_topic
        store, tail = owned.store, owned.tail
        if newer_claim(self.log, topic, partition, store, tail):
            self.on_lost([TopicPartition(self.processor.input_topic, partition)])
            return
        assert tail.last_position is not None  # our own claim, at least
        # Stamped as of its last checkpoint: inputs after it changed nothing (else they would
        # be in a checkpoint), and the next checkpoint names that stamp as its previous.
        key = self.snapshots.save(topic, partition, Snapshot(  # type: ignore[union-attr]
            tail.last_position, store.generation, store.epoch, store.generation,
            store.checkpointed, store.snapshot_entries()))
        owned.covered = True
        crash_point(f"{self.name}.after_snapshot")
        log_.info("%s: snapshot of %s[%d] at %s: %s", self.name, topic, partition,
                  tail.last_position, key, extra={"task": self.name, "partition": partition})

    def tables(self, name: str) -> dict[str, Any]:
        """A merged read-only view of one table across owned partitions (status, tests)."""
        merged: dict[str, Any] = {}
        for owned in self._owned.values():
            merged.update(owned.store.data[name])
        return merged

    def close(self) -> None:
        self.consumer.close()  # revokes, which checkpoints


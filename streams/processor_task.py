"""Runs one processor over the partitions of its input topic that this worker owns.

Per partition: restore the store from the changelog, skip inputs at or below the position
the changelog says was applied, fold the rest. A checkpoint makes progress durable in a
fixed order, each step only after the one before is durable:
  1. outputs (flushed), 2. changelog (stamped with the last applied input), 3. offsets.
A crash between 1 and 2 re-emits outputs (sinks skip them by their source stamps); a crash
between 2 and 3 re-reads inputs that the stamp then skips. Nothing is applied twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from streams.api import Input, Processor
from streams.faults import crash_point
from streams.outputs import OutputWriter
from streams.state.changelog import write_changes
from streams.state.recovery import restore
from streams.state.store import PartitionStore
from topics.codec import decode
from topics.log import Log, TopicPartition

log_ = logging.getLogger(__name__)


class ProcessorTask:
    def __init__(self, log: Log, processor: Processor, outputs: OutputWriter, group: str,
                 member: str = "", checkpoint_interval_s: float = 1.0,
                 checkpoint_messages: int = 32):
        self.log = log
        self.processor = processor
        self.outputs = outputs
        self.name = processor.name
        self.stores: dict[int, PartitionStore] = {}
        self._uncommitted: dict[TopicPartition, int] = {}
        self._since_checkpoint = 0
        self._checkpoint_interval_s = checkpoint_interval_s
        self._checkpoint_messages = checkpoint_messages
        self._next_checkpoint = time.monotonic() + checkpoint_interval_s
        self.consumer = log.consumer(group, [processor.input_topic], self, member)

    # -- rebalance ------------------------------------------------------------------------
    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            started = time.monotonic()
            store = restore(self.log, self.processor.changelog_topic, tp.partition,
                            self.processor.tables)
            self.stores[tp.partition] = store
            log_.info("%s: restored %s (applied up to %s) in %.2fs", self.name, tp,
                      store.applied, time.monotonic() - started)

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        self.checkpoint()
        for tp in tps:
            self.stores.pop(tp.partition, None)

    # -- processing -----------------------------------------------------------------------
    def step(self, max_messages: int = 32, timeout_s: float = 0.05) -> int:
        """Processes what is available (waiting at most `timeout_s`); returns messages seen."""
        messages = self.consumer.poll(max_messages, timeout_s)
        process, send = self.processor.process, self.outputs.send
        for msg in messages:
            store = self.stores[msg.partition]
            if store.applied is not None and msg.position <= store.applied:
                # Applied before a crash: the changelog holds its effect; only the offset
                # commit is missing.
                self._uncommitted[msg.tp] = msg.position
                continue
            schema, value = decode(msg.value)
            record = Input(schema, value, msg.partition, msg.position, msg.timestamp_ms)
            for out in process(store.views, record):
                send(out)
            store.applied = msg.position
            self._uncommitted[msg.tp] = msg.position
        self._since_checkpoint += len(messages)
        if (not messages  # idle: make what is done visible downstream now
                or self._since_checkpoint >= self._checkpoint_messages
                or time.monotonic() >= self._next_checkpoint):
            self.checkpoint()
        return len(messages)

    def checkpoint(self) -> None:
        self._since_checkpoint = 0
        self._next_checkpoint = time.monotonic() + self._checkpoint_interval_s
        if not self._uncommitted:
            return
        self.outputs.flush()  # 1. outputs
        crash_point(f"{self.name}.after_outputs")
        producer = self.outputs.producer
        for partition, store in self.stores.items():
            changes = store.take_dirty()
            if changes and store.applied is not None:
                write_changes(producer, self.processor.changelog_topic, partition,
                              store.applied, changes)
        producer.flush()  # 2. changelog
        crash_point(f"{self.name}.after_changelog")
        committed, self._uncommitted = self._uncommitted, {}
        self.consumer.commit(committed)  # 3. offsets

    def tables(self, name: str) -> dict[str, Any]:
        """A merged read-only view of one table across owned partitions (status, tests)."""
        merged: dict[str, Any] = {}
        for store in self.stores.values():
            merged.update(store.data[name])
        return merged

    def close(self) -> None:
        self.consumer.close()  # revokes, which checkpoints

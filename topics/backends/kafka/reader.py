"""Group-less reads of one partition, to the end as seen when the read started.

The end is the high watermark of the first fetch answered for the read, never a
ListOffsets(LATEST) answer: Tansu answers that with the newest batch's base offset + 1,
which is too low after multi-record batches. A fetch of an empty partition (or one read to
its end) is answered with the high watermark after the fetch's max wait, which is 1 ms
here, so reading an empty partition returns in a few milliseconds.

One consumer serves many reads, and kafka-python pipelines fetches: when a read ends,
a fetch sent at the consumer's position may still be in flight, or answered and buffered.
Its answer carries an old high watermark, and kafka-python accepts it for any later read
of the same partition that starts at that same offset (seen: 4 reads in 200 missed data
written before they started). So each reader remembers those (partition, offset) tails; a
read starting at one starts a message earlier instead (and skips it), or, at offset 0,
gets a fresh consumer (about 5 ms). kafka-python discards every other stale answer, as its
offset does not match the position.
Each read also re-assigns its partitions, so no high watermark survives from a read before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka.errors import OffsetOutOfRangeError

from topics.log import Message, TopicError

POLL_MS = 2  # one round of waiting for a fetch answer
MAX_RECORDS = 5000
READER_CONFIG: dict[str, Any] = {
    "group_id": None,
    "enable_auto_commit": False,
    "auto_offset_reset": "none",  # out of range: decided here, not silently rewound
    "fetch_max_wait_ms": 1,  # 0 makes kafka-python send no fetch at all
    "enable_incremental_fetch_sessions": False,
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
}


def to_message(record: Any) -> Message:
    return Message(record.topic, record.partition, record.offset, record.value or b"",
                   record.key, record.timestamp)


class Reader:
    def __init__(self, bootstrap: str, options: dict[str, Any], timeout_s: float):
        self._config = {**options, **READER_CONFIG, "bootstrap_servers": bootstrap}
        self.timeout_s = timeout_s
        self.consumer = KafkaConsumer(**self._config)
        self._tails: set[tuple[KafkaTP, int]] = set()
        self._unsure = False  # a read ended where its tail is unknown: renew before the next

    # -- one read at a time ---------------------------------------------------------------
    def _start(self, offsets: dict[KafkaTP, int]) -> None:
        """Assigns and seeks, so that no stale fetch answer can be taken for this read: a
        partition whose start is a tail starts one offset earlier (the caller skips what
        lies before its start), or, where that is a tail too, the consumer is renewed."""
        seeks = dict(offsets)
        for tp, offset in offsets.items():
            if (tp, offset) in self._tails:
                seeks[tp] = offset - 1
                if offset == 0 or (tp, offset - 1) in self._tails:
                    self._unsure = True
        if self._unsure:
            self.consumer.close(autocommit=False)
            self.consumer = KafkaConsumer(**self._config)
            self._tails.clear()
            self._unsure = False
            seeks = dict(offsets)
        self.consumer.unsubscribe()  # fresh partition states: no high watermark carried over
        self.consumer.assign(list(seeks))
        for tp, offset in seeks.items():
            self.consumer.seek(tp, offset)

    def _finish(self) -> None:
        try:
            for tp in self.consumer.assignment():
                position = self.consumer.position(tp, timeout_ms=1000)
                if position is None:
                    self._unsure = True
                else:
                    self._tails.add((tp, position))
        except Exception:  # no position: any offset may have a fetch in flight
            self._unsure = True

    def _poll(self) -> dict[KafkaTP, list[Any]]:
        return self.consumer.poll(timeout_ms=POLL_MS, max_records=MAX_RECORDS)

    def _exists(self, topic: str, partition: int) -> None:
        parts = self.consumer.partitions_for_topic(topic)
        if not parts or partition not in parts:
            raise TopicError(f"{topic}[{partition}]: no such topic or partition")

    # -- reads ----------------------------------------------------------------------------
    def read(self, topic: str, partition: int, start: int) -> Iterator[Message]:
        """Messages from offset `start` to the high watermark seen first."""
        self._exists(topic, partition)
        tp = KafkaTP(topic, partition)
        self._start({tp: start})
        try:
            end: int | None = None
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    records = self._poll().get(tp, [])
                except OffsetOutOfRangeError:
                    first = self.consumer.beginning_offsets([tp])[tp]
                    if start >= first:
                        return  # `start` is past the end: nothing after it
                    self.consumer.seek(tp, first)  # the head was deleted (retention)
                    continue
                if end is None:
                    end = self.consumer.highwater(tp)
                for record in records:
                    if record.offset < start:
                        continue
                    if end is not None and record.offset >= end:
                        return
                    yield to_message(record)
                if end is not None and self.consumer.position(tp) >= end:
                    return
                if records:
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic}[{partition}]: no fetch answered "
                                       f"within {self.timeout_s:.0f}s")
        finally:
            self._finish()

    def read_at(self, topic: str, partition: int, position: int) -> Message:
        for msg in self.read(topic, partition, position):
            if msg.position == position:
                return msg
            break
        raise TopicError(f"{topic}[{partition}]: no message at position {position}")

    def highwaters(self, tps: list[KafkaTP]) -> dict[KafkaTP, int]:
        """The high watermark of each partition, from fetches. They start at the
        ListOffsets(LATEST) answer, which is at most the true end (on Tansu too), so each
        fetch returns at most the partition's last batch."""
        if not tps:
            return {}
        self._start(self.consumer.end_offsets(tps))
        try:
            deadline = time.monotonic() + self.timeout_s
            while True:
                marks = {tp: self.consumer.highwater(tp) for tp in tps}
                if all(mark is not None for mark in marks.values()):
                    return {tp: mark for tp, mark in marks.items() if mark is not None}
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no high watermark within {self.timeout_s:.0f}s for "
                                       + ", ".join(f"{tp.topic}[{tp.partition}]" for tp, m
                                                   in marks.items() if m is None))
                self._poll()
        finally:
            self._finish()

    def beginnings(self, tps: list[KafkaTP]) -> dict[KafkaTP, int]:
        return dict(self.consumer.beginning_offsets(tps)) if tps else {}

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class Readers:
    """A pool: a read takes a reader for as long as its iterator lives, so reads may nest."""

    def __init__(self, bootstrap: str, options: dict[str, Any], timeout_s: float):
        self._args = (bootstrap, options, timeout_s)
        self._idle: list[Reader] = []
        self._all: list[Reader] = []
        self._lock = threading.Lock()

    @contextmanager
    def take(self) -> Iterator[Reader]:
        with self._lock:
            reader = self._idle.pop() if self._idle else None
        if reader is None:
            reader = Reader(*self._args)
            with self._lock:
                self._all.append(reader)
        try:
            yield reader
        finally:
            with self._lock:
                self._idle.append(reader)

    def close(self) -> None:
        with self._lock:
            readers, self._all, self._idle = self._all, [], []
        for reader in readers:
            reader.close()

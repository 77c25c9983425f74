"""Runs a sink connector over the partitions of a topic that this worker owns.

Sinks see each input at least once and may see a processor's outputs twice (re-emitted
after a processor crash). Every value a sink reads carries a stamp that rises along its
partition (the source position it was made from); values at or below the last stamp seen
are skipped. Offsets are committed only where the sink says it holds no buffered work, and
after the events it emitted are durable, with the highest stamp seen up to the committed
message stored beside them as commit metadata: that is where deduplication resumes after a
restart. (Not the highest stamp seen at commit time: a poll may read past the committed
message, and a stamp from there would make the restarted sink skip what it never applied.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from streams.api import Input, Output
from streams.outputs import OutputWriter
from topics.codec import shared_decode
from topics.log import Log, TopicPartition

Stamp = tuple[int, int]
# A committable position and the highest stamp seen up to and including it.
Mark = tuple[int, Stamp | None]


class Sink(Protocol):
    name: str
    topic: str

    def stamp(self, record: Input) -> Stamp: ...

    def process(self, record: Input) -> list[Output]:
        """Handles one value; returns events to emit once its writes are durable."""

    def idle(self, partition: int) -> bool:
        """True when nothing of this partition is buffered: offsets may be committed here."""

    def reset(self, partition: int) -> None:
        """Drops buffered work of a partition (it moved, or is being re-read)."""


def _format_stamp(stamp: Stamp | None) -> str:
    return "" if stamp is None else f"stamp={stamp[0]},{stamp[1]}"


def _parse_stamp(text: str) -> Stamp | None:
    if not text.startswith("stamp="):
        return None
    first, second = text.removeprefix("stamp=").split(",")
    return int(first), int(second)


class SinkTask:
    def __init__(self, log: Log, sink: Sink, outputs: OutputWriter, group: str, member: str = ""):
        self.log = log
        self.sink = sink
        self.name = f"sink-{sink.name}"
        self.outputs = outputs
        self._stamps: dict[int, Stamp | None] = {}
        self._committable: dict[TopicPartition, Mark] = {}
        self._metadata_kept: bool | None = None  # unknown until the first commit
        self._skipped: dict[TopicPartition, Mark] = {}  # duplicates seen before that
        self.consumer = log.consumer(group, [sink.topic], self, member)

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self.sink.reset(tp.partition)
            stamp = _parse_stamp(self.consumer.committed_metadata(tp))
            committed = self.consumer.committed(tp)
            if stamp is None and committed is not None:
                # A log that keeps no commit metadata (Tansu): only processed messages are
                # committed there (see step), so the committed message's stamp is the highest.
                msg = self.log.read_at(tp.topic, tp.partition, committed)
                schema, value = shared_decode(msg.value)
                stamp = self.sink.stamp(Input(schema, value, tp.partition, msg.position,
                                              msg.timestamp_ms))
            self._stamps[tp.partition] = stamp
            if committed is not None and self._metadata_kept is None:
                # Ask once whether this log keeps commit metadata: re-commit the same
                # position with its stamp and read it back.
                text = _format_stamp(stamp)
                self.consumer.commit({tp: committed}, {tp: text})
                self._metadata_kept = self.consumer.committed_metadata(tp) == text

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        self.checkpoint()
        for tp in tps:
            self.sink.reset(tp.partition)
            self._stamps.pop(tp.partition, None)

    def step(self, max_messages: int = 32, timeout_s: float = 0.05) -> int:
        messages = self.consumer.poll(max_messages, timeout_s)
        emitted = False
        for msg in messages:
            schema, value = shared_decode(msg.value)
            record = Input(schema, value, msg.partition, msg.position, msg.timestamp_ms)
            stamp = self.sink.stamp(record)
            last = self._stamps.get(msg.partition)
            processed = last is None or stamp > last
            if processed:
                self._stamps[msg.partition] = stamp
                for out in self.sink.process(record):
                    self.outputs.send(out)
                    emitted = True
            # A skipped duplicate may be committed past only where the stamp is kept beside
            # the position; elsewhere the committed message must carry the highest stamp.
            # A duplicate stamped exactly the highest (the re-emitted copy of the last value
            # applied, e.g. an end marker re-sent after a processor crash) does carry it:
            # without committing it, a log that keeps no commit metadata (Tansu) would hold
            # a tail of re-emitted duplicates uncommitted forever (a lag that never drains).
            if self.sink.idle(msg.partition):
                mark = (msg.position, self._stamps.get(msg.partition))
                if processed or self._metadata_kept or stamp == last:
                    self._committable[msg.tp] = mark
                elif self._metadata_kept is None:  # decided at the next commit
                    self._skipped[msg.tp] = mark
        if emitted or self._committable:
            self.checkpoint()
        return len(messages)

    def checkpoint(self) -> None:
        self.outputs.flush()
        committable, self._committable = self._committable, {}
        skipped, self._skipped = self._skipped, {}
        if committable:
            self._commit(committable)
        if self._metadata_kept and skipped:
            # Duplicates read before we knew that metadata is kept, past the last commit.
            later = {tp: mark for tp, mark in skipped.items()
                     if tp not in committable or mark[0] > committable[tp][0]}
            if later:
                self._commit(later)

    def _commit(self, marks: dict[TopicPartition, Mark]) -> None:
        # The highest stamp seen up to the position goes with it: duplicates committed past
        # may stamp lower than what was applied, so the position alone cannot say it.
        stamps = {tp: _format_stamp(stamp) for tp, (_pos, stamp) in marks.items()}
        self.consumer.commit({tp: pos for tp, (pos, _stamp) in marks.items()}, stamps)
        if self._metadata_kept is None:  # the first commit answers it for a new group
            tp, text = next(iter(stamps.items()))
            self._metadata_kept = self.consumer.committed_metadata(tp) == text

    def close(self) -> None:
        self.consumer.close()

"""Runs a sink connector over the partitions of a topic that this worker owns.

Sinks see each input at least once and may see a processor's outputs twice (re-emitted
after a processor crash). Every value a sink reads carries a stamp that rises along its
partition (the source position it was made from); values at or below the last stamp seen
are skipped. Offsets are committed only where the sink says it holds no buffered work, and
after the events it emitted are durable, with the highest stamp seen up to the committed
message stored beside them as commit metadata: that is where deduplication resumes after a
restart. Stamps start with the replay epoch of the state that made the value: a replay
writes a ReplayFence (stamp (epoch, -1, -1)) after the values it supersedes, those values are
void here (replay.py), and the replayed ones, of the new epoch, stamp above all older ones.
(Not the highest stamp seen at commit time: a poll may read past the committed
message, and a stamp from there would make the restarted sink skip what it never applied.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Protocol

from streams import metrics
from streams.api import Input, Output
from streams.faults import crash_armed, crash_point
from streams.outputs import OutputWriter
from topics.codec import schema_name, shared_decode
from topics.log import Log, TopicPartition
from topics.spec import SPECS

Stamp = tuple[int, ...]  # (replay epoch, *the sink's own stamp)
# A committable position and the highest stamp seen up to and including it.
Mark = tuple[int, Stamp | None]


REPLAY_FENCE = "ReplayFence"


class Sink(Protocol):
    name: str
    topic: str

    def stamp(self, record: Input) -> tuple[int, ...]:
        """Rises along the partition (the source position the value was made from)."""

    def process(self, record: Input) -> list[Output]:
        """Handles one value; returns events to emit once its writes are durable."""

    def idle(self, partition: int) -> bool:
        """True when nothing of this partition is buffered: offsets may be committed here."""

    def reset(self, partition: int) -> None:
        """Drops buffered work of a partition (it moved, or is being re-read)."""


def _format_stamp(stamp: Stamp | None) -> str:
    return "" if stamp is None else "stamp=" + ",".join(map(str, stamp))


def _parse_stamp(text: str) -> Stamp | None:
    if not text.startswith("stamp="):
        return None
    stamp = tuple(int(part) for part in text.removeprefix("stamp=").split(","))
    return stamp if len(stamp) > 2 else (0, *stamp)  # before epochs: epoch 0


def fence_stamp(value: dict[str, Any]) -> Stamp:
    """A ReplayFence's stamp: below every value of its epoch, above every older one."""
    return value["epoch"], -1, -1


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
        # Per partition, the replays known: (from_position, epoch). Values of a lower epoch
        # made from inputs at or after from_position are void (replay.py).
        self._fences: dict[int, list[tuple[int, int]]] = {}
        self._has_fences = REPLAY_FENCE in SPECS[sink.topic].schemas if sink.topic in SPECS \
            else False
        self.consumer = log.consumer(group, [sink.topic], self, member)

    def _stamp(self, record: Input) -> Stamp:
        if record.schema == REPLAY_FENCE:
            return fence_stamp(record.value)
        return (record.value.get("epoch", 0), *self.sink.stamp(record))

    def _void(self, record: Input) -> bool:
        """A value a replay superseded."""
        fences = self._fences.get(record.partition)
        if not fences or record.schema == REPLAY_FENCE:
            return False
        epoch = record.value.get("epoch", 0)
        source = record.value["source_position"]
        return any(epoch < e and source >= f for f, e in fences)

    def _read_fences(self, tp: TopicPartition, after: int | None) -> None:
        """The replays after the committed position (what this worker re-reads): a fence
        comes after the values it voids, so it must be known before they are read."""
        self._fences[tp.partition] = [] if not self._has_fences else [
            (v["from_position"], v["epoch"]) for v in
            (shared_decode(m.value)[1] for m in self.log.read(tp.topic, tp.partition, after)
             if schema_name(m.value) == REPLAY_FENCE)]

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
                stamp = self._stamp(Input(schema, value, tp.partition, msg.position,
                                          msg.timestamp_ms))
            self._stamps[tp.partition] = stamp
            self._read_fences(tp, committed)
            if committed is not None and self._metadata_kept is None:
                # Ask once whether this log keeps commit metadata: re-commit the same
                # position with its stamp and read it back.
                text = _format_stamp(stamp)
                self.consumer.commit({tp: committed}, {tp: text})
                self._metadata_kept = self.consumer.committed_metadata(tp) == text

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        self.checkpoint()
        self._drop(tps)

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        """Taken away without a clean revoke: drop the buffered work, commit nothing."""
        self._drop(tps)

    def _drop(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self.sink.reset(tp.partition)
            self._stamps.pop(tp.partition, None)
            self._fences.pop(tp.partition, None)
            self._committable.pop(tp, None)
            self._skipped.pop(tp, None)

    def step(self, max_messages: int = 32, timeout_s: float = 0.05) -> int:
        messages = self.consumer.poll(max_messages, timeout_s)
        emitted = False
        for msg in messages:
            schema, value = shared_decode(msg.value)
            record = Input(schema, value, msg.partition, msg.position, msg.timestamp_ms)
            if msg.partition not in self._stamps:
                continue  # lost while this poll's messages were in hand
            stamp = self._stamp(record)
            last = self._stamps.get(msg.partition)
            processed = (last is None or stamp > last) and not self._void(record)
            if processed:
                self._stamps[msg.partition] = stamp
                if schema == REPLAY_FENCE:
                    self._fences[msg.partition].append((value["from_position"],
                                                        value["epoch"]))
                else:
                    started = time.monotonic()
                    for out in self.sink.process(record):
                        self.outputs.send(out)
                        emitted = True
                    metrics.on_sink_load(self.sink.name, time.monotonic() - started, schema,
                                         value)
                metrics.on_message(self.name, msg.topic, msg.partition, schema, value)
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
            crossing = f"{self.name}.after_boundary_poll"
            if crash_armed(crossing) and any(
                    m.partition == after.partition and schema_name(m.value) == "EndMarker"
                    for m, after in pairwise(messages)):
                # This poll went past a batch's end on a partition: a restart resumes from
                # the commit just made, with the stamp as of it.
                crash_point(crossing)
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

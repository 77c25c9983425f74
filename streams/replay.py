"""Replay: rewind a processor and the sinks downstream of it, to reprocess history.

For each input partition, from the chosen start:
- the processor's group is set to the message before the start;
- a fence in its changelog voids the entries stamped at or after the start, so the table
  is restored as it was before the start and rebuilt by reprocessing;
- each downstream sink group is set to the last output made before the start, so the sink
  re-delivers from there (sinks are idempotent, and skip re-emitted duplicates by stamp).
Workers of these groups must be stopped first, as with Kafka's reset tool.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.api import Processor
from streams.state.changelog import write_fence
from topics.codec import decode
from topics.log import GroupBusyError, Log, TopicPartition


@dataclass(frozen=True)
class SinkGroup:
    group: str
    topic: str  # carries values with a `source_position` stamp


@dataclass(frozen=True)
class ReplayPlan:
    starts: dict[int, int | None]  # partition -> first position to reprocess (None: nothing)
    description: str


def plan(log: Log, topic: str, start: str) -> ReplayPlan:
    """`earliest`, `position:N` (every partition, from its first message at or after N), or
    `batch:ID` (every partition, from the first message of that batch)."""
    kind, _, arg = start.partition(":")
    if kind not in ("earliest", "position", "batch") or (kind == "batch" and not arg):
        raise ValueError(f"--from {start!r}: expected earliest, position:N or batch:ID")
    if kind == "position":
        _int(arg)
    starts: dict[int, int | None] = {}
    for p in log.partitions(topic):
        first = None
        for msg in log.read(topic, p):
            if kind == "earliest":
                first = msg.position
            elif kind == "position":
                first = msg.position if msg.position >= _int(arg) else None
            else:
                first = msg.position if decode(msg.value)[1].get("batch_id") == arg else None
            if first is not None:
                break
        starts[p] = first
    if kind == "batch" and all(v is None for v in starts.values()):
        raise ValueError(f"--from {start}: no message of batch {arg} on {topic}")
    return ReplayPlan(starts, start)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--from position:{text}: expected a whole number") from None


def check_stopped(log: Log, groups: list[str]) -> None:
    busy = {g: log.active_members(g) for g in groups}
    busy = {g: members for g, members in busy.items() if members}
    if busy:
        raise GroupBusyError("stop the workers first; running members: " + "; ".join(
            f"{g}: {', '.join(m)}" for g, m in busy.items()))


def rewind(log: Log, processor: Processor, group: str, sinks: list[SinkGroup],
           replay: ReplayPlan) -> None:
    check_stopped(log, [group, *(s.group for s in sinks)])
    producer = log.producer()
    for partition, start in replay.starts.items():
        if start is None:
            continue
        before = _position_before(log, processor.input_topic, partition, start)
        log.reset_group(group, {TopicPartition(processor.input_topic, partition): before})
        write_fence(producer, processor.changelog_topic, partition, start)
        for sink in sinks:
            last = _sink_restart(log, sink.topic, partition, start)
            log.reset_group(sink.group, {TopicPartition(sink.topic, partition): last})
    producer.flush()


def _position_before(log: Log, topic: str, partition: int, start: int) -> int | None:
    """Position of the last message before `start` (None: there is none)."""
    last = None
    for msg in log.read(topic, partition):
        if msg.position >= start:
            break
        last = msg.position
    return last


def _sink_restart(log: Log, topic: str, partition: int, start: int) -> int | None:
    """The last end marker made before `start`: sinks commit only between batches, so a
    sink restarts there and re-reads the open batch whole."""
    last = None
    for msg in log.read(topic, partition):
        schema, value = decode(msg.value)
        if value["source_position"] >= start:
            break
        if schema == "EndMarker":
            last = msg.position
    return last



"""Replay: rewind a processor and the sinks downstream of it, to reprocess history.

For each input partition, from the chosen start:
- the processor's group is set to the message before the start;
- a fence in its changelog voids the entries stamped at or after the start, so the table
  is restored as it was before the start and rebuilt by reprocessing, and it opens a new
  replay EPOCH: every output made from the restored state carries it;
- a `ReplayFence` on the output topic says the same to the sinks: outputs of an older
  epoch made from inputs at or after the start are void (superseded by the replay's), so
  a replay after a processor fix really changes what the sinks hold;
- each downstream sink group is set to the last point before the start where it had no
  open batch (it re-reads from there), or to the beginning for a sink that is rebuilt
  from nothing (the warehouse's membership: its merges cannot be undone one by one).
Workers of these groups must be stopped first, as with Kafka's reset tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from streams.api import Processor
from streams.state.changelog import FENCE, write_fence
from streams.state.snapshots import SnapshotStore
from topics.codec import decode, encode, schema_name
from topics.log import GroupBusyError, Log, TopicPartition

REPLAY_FENCE = "ReplayFence"


@dataclass(frozen=True)
class SinkGroup:
    group: str
    topic: str  # carries values with a `source_position` stamp
    rebuild: bool = False  # re-read from the beginning (its target was emptied)


@dataclass(frozen=True)
class ReplayPlan:
    starts: dict[int, int | None]  # partition -> first position to reprocess (None: nothing)
    description: str


FROM_FORMS = ("earliest, position:N, batch:ID, time:WHEN (ISO 8601, or epoch ms) or, on "
              "Kinesis, sequence:SEQ")


def plan(log: Log, topic: str, start: str) -> ReplayPlan:
    """`earliest`, `position:N` (every partition, from its first message at or after N),
    `batch:ID` (every partition, from the first message of that batch), `time:WHEN` (every
    partition, from its first message appended at or after WHEN: the log's own timestamps,
    Kinesis's arrival times through AT_TIMESTAMP, Kafka's record times), or on Kinesis
    `sequence:SEQ` (from the record with that sequence number: seek.py there)."""
    kind, _, arg = start.partition(":")
    if kind not in ("earliest", "position", "batch", "time", "sequence") or (
            kind in ("batch", "sequence") and not arg):
        raise ValueError(f"--from {start!r}: expected {FROM_FORMS}")
    if kind == "sequence":
        by_sequence = getattr(log, "starts_at_sequence", None)
        if by_sequence is None:
            raise ValueError(f"--from {start}: sequence numbers are Kinesis's; on this "
                             "backend use position:N")
        return ReplayPlan(by_sequence(topic, arg), start)
    if kind == "time":
        since_ms = _time_ms(arg)
        return ReplayPlan({p: log.first_since(topic, p, since_ms)
                           for p in log.partitions(topic)}, start)
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


def _time_ms(text: str) -> int:
    """Epoch milliseconds of `2026-12-01T10:00:00Z`, `2026-12-01 10:00` (UTC unless an
    offset is given) or a plain number of epoch ms."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--from time:{text}: expected an ISO 8601 time such as "
                         "2026-12-01T10:00:00Z, or epoch milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


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


def current_epoch(log: Log, changelog_topic: str,
                  snapshots: SnapshotStore | None = None) -> int:
    """The highest replay epoch any partition of the changelog (or its snapshots) is in."""
    epoch = 0
    for p in log.partitions(changelog_topic):
        for msg in log.read(changelog_topic, p):
            if schema_name(msg.value) == FENCE:
                epoch = max(epoch, decode(msg.value)[1]["epoch"])
        if snapshots is not None:
            newest = next(iter(snapshots.candidates(changelog_topic, p)), None)
            if newest is not None:
                epoch = max(epoch, newest.epoch)
    return epoch


def rewind(log: Log, processor: Processor, group: str, sinks: list[SinkGroup],
           replay: ReplayPlan, snapshots: SnapshotStore | None = None) -> int:
    """Rewinds; returns the new epoch."""
    check_stopped(log, [group, *(s.group for s in sinks)])
    epoch = current_epoch(log, processor.changelog_topic, snapshots) + 1
    producer = log.producer()
    for partition, start in replay.starts.items():
        if start is None:
            continue
        before = _position_before(log, processor.input_topic, partition, start)
        log.reset_group(group, {TopicPartition(processor.input_topic, partition): before})
        write_fence(producer, processor.changelog_topic, partition, start, epoch)
        for topic in sorted({s.topic for s in sinks}):
            producer.send(topic, partition, encode(REPLAY_FENCE, {"from_position": start,
                                                                  "epoch": epoch}))
        for sink in sinks:
            last = None if sink.rebuild else _sink_restart(log, sink.topic, partition, start)
            log.reset_group(sink.group, {TopicPartition(sink.topic, partition): last})
    producer.flush()
    return epoch


def _position_before(log: Log, topic: str, partition: int, start: int) -> int | None:
    """Position of the last message before `start` (None: there is none)."""
    last = None
    for msg in log.read(topic, partition):
        if msg.position >= start:
            break
        last = msg.position
    return last


def _sink_restart(log: Log, topic: str, partition: int, start: int) -> int | None:
    """The last position, before the first output made from an input at or after `start`,
    where no batch was open on the partition: sinks commit only there, so a sink restarts
    there and re-reads every open batch whole. Outputs voided by earlier replays are passed
    over as the sinks pass over them."""
    fences = [(v["from_position"], v["epoch"]) for v in
              (decode(m.value)[1] for m in log.read(topic, partition)
               if schema_name(m.value) == REPLAY_FENCE)]
    open_batches: set[str] = set()
    last = None
    for msg in log.read(topic, partition):
        schema, value = decode(msg.value)
        if schema == REPLAY_FENCE:
            continue
        source, epoch = value["source_position"], value.get("epoch", 0)
        if any(epoch < e and source >= f for f, e in fences):
            continue
        if source >= start:
            break
        if schema == "EndMarker":
            open_batches.discard(value["batch_id"])
        else:
            open_batches.add(value["batch_id"])
        if not open_batches:
            last = msg.position
    return last

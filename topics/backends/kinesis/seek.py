"""Where a replay starts on Kinesis: by arrival time (AT_TIMESTAMP) and by sequence number.

`--from time:WHEN`: each virtual partition starts at its first message that arrived at or
after WHEN. The shards of its lineage are read oldest first, each from an AT_TIMESTAMP
iterator instead of from its start, so the lookup reads what arrived after WHEN, not the
stream's history. (Kinesis takes the time in whole seconds as boto3 sends it, so the first
answers may hold records of the second before WHEN: they are passed over here.)

`--from sequence:SEQ`: SEQ names one record. Its shard is found by asking Kinesis (a
sequence number is valid in the shard that gave it and refused by every other). A virtual
partition whose lineage holds that shard starts at its first message at or after the record,
in the partition's own order; every other one at its first message that arrived at or after
the record did: the cut a time replay from that moment makes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from topics.backends.kinesis.envelope import hash_key_of
from topics.backends.kinesis.positions import pack
from topics.backends.kinesis.records import ShardCursor, read_shard
from topics.backends.kinesis.streams import Shard, Streams, chain


class SequenceNotFound(ValueError):
    """No shard of the stream holds a record with that sequence number."""


def first_of(partition: int, cursors: Iterable[ShardCursor], since_ms: int = 0) -> int | None:
    """The position of the partition's first message the cursors read, in order (and, with
    `since_ms`, that arrived at or after it)."""
    for cursor in cursors:
        for msg in read_shard(cursor):
            if msg.partition == partition and msg.timestamp_ms >= since_ms:
                return msg.position
    return None


def first_since(kinesis: Any, streams: Streams, topic: str, partition: int,
                since_ms: int) -> int | None:
    if since_ms > time.time() * 1000:
        return None  # nothing has arrived after a time still to come
    lineage = chain(streams.shards(topic), hash_key_of(partition, streams.partition_count(topic)))

    def cursors() -> Iterator[ShardCursor]:
        for shard in lineage:
            cursor = ShardCursor(kinesis, streams.name(topic), topic, shard)
            cursor.start_at_time(since_ms)
            yield cursor

    return first_of(partition, cursors(), since_ms)


def starts_at_sequence(kinesis: Any, streams: Streams, topic: str,
                       sequence: str) -> dict[int, int | None]:
    """Virtual partition -> the first position to replay from, for `--from sequence:SEQ`."""
    if not sequence.isdigit():
        raise SequenceNotFound(f"--from sequence:{sequence}: expected the decimal sequence "
                               "number of a Kinesis record")
    shards = streams.shards(topic)
    holder, arrived_ms = _holder(kinesis, streams.name(topic), shards, sequence)
    at = pack(holder.index, int(sequence))
    count = streams.partition_count(topic)
    starts: dict[int, int | None] = {}
    for p in range(count):
        lineage = chain(shards, hash_key_of(p, count))
        if holder not in lineage:
            starts[p] = first_since(kinesis, streams, topic, p, arrived_ms)
            continue
        starts[p] = first_of(p, _cursors_from(kinesis, streams.name(topic), topic, lineage,
                                              holder, at))
    return starts


def _cursors_from(kinesis: Any, stream: str, topic: str, lineage: list[Shard], holder: Shard,
                  at: int) -> Iterator[ShardCursor]:
    """The holder's shard from the record at `at`, then its successors from their start."""
    for shard in lineage:
        if shard.index < holder.index:
            continue
        cursor = ShardCursor(kinesis, stream, topic, shard)
        if shard == holder:
            cursor.start_at(at)
        yield cursor


def _holder(kinesis: Any, stream: str, shards: list[Shard], sequence: str) -> tuple[Shard, int]:
    """The shard holding the record, and the record's arrival time in epoch ms."""
    for shard in shards:
        try:
            iterator = kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard.id, ShardIteratorType="AT_SEQUENCE_NUMBER",
                StartingSequenceNumber=sequence)["ShardIterator"]
        except kinesis.exceptions.InvalidArgumentException:
            continue  # the sequence number encodes another shard
        records = kinesis.get_records(ShardIterator=iterator, Limit=1)["Records"]
        if records and records[0]["SequenceNumber"] == sequence:
            return shard, int(records[0]["ApproximateArrivalTimestamp"].timestamp() * 1000)
    raise SequenceNotFound(f"--from sequence:{sequence}: no record of stream {stream} has "
                           "that sequence number (a typo, another stream, or trimmed by the "
                           "stream's retention)")

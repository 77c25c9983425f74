"""Positions on Kinesis: one non-negative int per sub-record, comparable across shards.

    position = (shard index * 10**129 + sequence number) * 10**10 + sub-sequence number

The shard index is the number in the shard id (`shardId-000000000012` -> 12), the sequence
number is the record's (Kinesis: up to 129 decimal digits), the sub-sequence number is the
sub-record's index inside a KPL aggregate (0 for a plain record; an aggregate of at most
1 MiB holds far fewer than 10**10 sub-records).

Why the order holds for a virtual partition: every record of virtual partition v is put with
one explicit hash key (envelope.hash_key_of), so at any time v sits in exactly one open
shard, and the shards that ever held that hash key form a chain, each one a child (split) or
the merged child of the one before. Kinesis numbers shards of a stream in creation order and
a child is created after its parents, so along the chain the shard index grows. Inside one
shard, sequence numbers grow with the time of the put, and sub-sequence numbers with the
place inside the aggregate. So comparing positions compares (shard index, sequence, sub),
which is v's order in the log. Positions of different virtual partitions are comparable as
ints but mean nothing to each other, as offsets of two Kafka partitions.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE_DIGITS = 129
SUB_DIGITS = 10
SEQUENCE_SPAN = 10**SEQUENCE_DIGITS
SUB_SPAN = 10**SUB_DIGITS
SHARD_PREFIX = "shardId-"


@dataclass(frozen=True, slots=True, order=True)
class KinesisPosition:
    shard: int  # the shard index
    sequence: int
    sub: int = 0

    @property
    def shard_id(self) -> str:
        return shard_id(self.shard)


def shard_index(shard_id_: str) -> int:
    """`shardId-000000000012` -> 12."""
    if not shard_id_.startswith(SHARD_PREFIX) or not shard_id_[len(SHARD_PREFIX):].isdigit():
        raise ValueError(f"not a Kinesis shard id: {shard_id_!r} (expected shardId-NNNNNNNNNNNN)")
    return int(shard_id_[len(SHARD_PREFIX):])


def shard_id(index: int) -> str:
    return f"{SHARD_PREFIX}{index:012d}"


def pack(shard: int, sequence: int, sub: int = 0) -> int:
    if shard < 0 or not 0 <= sequence < SEQUENCE_SPAN or not 0 <= sub < SUB_SPAN:
        raise ValueError(f"position parts out of range: shard {shard}, sequence {sequence}, "
                         f"sub-sequence {sub}")
    return (shard * SEQUENCE_SPAN + sequence) * SUB_SPAN + sub


def unpack(position: int) -> KinesisPosition:
    if position < 0:
        raise ValueError(f"a Kinesis position is a non-negative int, not {position}")
    rest, sub = divmod(position, SUB_SPAN)
    shard, sequence = divmod(rest, SEQUENCE_SPAN)
    return KinesisPosition(shard, sequence, sub)

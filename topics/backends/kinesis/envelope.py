"""What one message looks like inside a Kinesis record (or a KPL sub-record).

Kinesis has no headers and its partition keys are short Unicode strings, so the message's
virtual partition and its key travel in the data, before the value:

    0xA5 | varint(virtual partition) | varint(key length + 1, 0 = no key) | key | value

A virtual partition `v` of a topic with `n` of them owns the hash-key range
[v * 2**128 // n, (v + 1) * 2**128 // n); every record of `v` is put with the same explicit
hash key (`hash_key_of`), so it sits in exactly one open shard at any time, whatever the
resharding, and its order is the order of that shard's lineage.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = 0xA5
HASH_SPACE = 1 << 128


class EnvelopeError(ValueError):
    """A record's data is not a message of this project (another producer wrote it)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    partition: int  # the virtual partition
    key: bytes | None
    value: bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if at >= len(data) or shift > 63:
            raise EnvelopeError("truncated varint in a Kinesis message envelope")
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, at
        shift += 7


def encode(partition: int, key: bytes | None, value: bytes) -> bytes:
    key_part = _varint(0) if key is None else _varint(len(key) + 1) + key
    return bytes((MAGIC,)) + _varint(partition) + key_part + value


def decode(data: bytes) -> Envelope:
    if not data or data[0] != MAGIC:
        raise EnvelopeError("not a message envelope (first byte is not 0xA5)")
    partition, at = _read_varint(data, 1)
    key_len, at = _read_varint(data, at)
    key = None
    if key_len:
        end = at + key_len - 1
        if end > len(data):
            raise EnvelopeError("a Kinesis message envelope's key runs past its data")
        key, at = data[at:end], end
    return Envelope(partition, key, data[at:])


def range_of(partition: int, partitions: int) -> tuple[int, int]:
    """The hash keys [start, end] (inclusive, as Kinesis writes them) of a virtual partition."""
    if not 0 <= partition < partitions:
        raise ValueError(f"virtual partition {partition} out of range 0..{partitions - 1}")
    return (partition * HASH_SPACE // partitions,
            (partition + 1) * HASH_SPACE // partitions - 1)


def hash_key_of(partition: int, partitions: int) -> int:
    """The one explicit hash key every record of a virtual partition is put with: the middle
    of its range, so a split at an even point (UpdateShardCount) never lands on it."""
    start, end = range_of(partition, partitions)
    return (start + end) // 2


def partition_of_hash_key(hash_key: int, partitions: int) -> int:
    """The virtual partition whose range holds `hash_key`."""
    if not 0 <= hash_key < HASH_SPACE:
        raise ValueError(f"hash key {hash_key} outside 0..2**128-1")
    # the largest v with v * HASH_SPACE // partitions <= hash_key (range_of's floor, inverted)
    return ((hash_key + 1) * partitions - 1) // HASH_SPACE

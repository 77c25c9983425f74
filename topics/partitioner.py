"""Kafka's default partitioner: murmur2 of the key, positive, modulo the partition count.

The importer picks partitions itself (rather than letting a client do it) so that it can
count records per partition for the end markers, and so that every backend agrees with
what a Kafka producer would have chosen for the same key.
"""

from __future__ import annotations

from murmurhash2 import murmurhash2

KAFKA_SEED = 0x9747B28C


def murmur2(key: bytes) -> int:
    return murmurhash2(key, KAFKA_SEED) & 0x7FFFFFFF


def partition_for(key: str, partitions: int) -> int:
    return (murmurhash2(key.encode("utf-8"), KAFKA_SEED) & 0x7FFFFFFF) % partitions

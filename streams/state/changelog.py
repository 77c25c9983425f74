"""Changelog messages: a table partition's changes, stamped with the input position they
cover. Written after the outputs they produced are durable, read back by recovery.

A replay rewinds a table by appending a fence rather than cutting the log (Kafka cannot cut
a partition's tail): entries before a fence stamped at or after its `from_position` are
void, and recovery skips them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from topics.codec import decode, encode, schema_name
from topics.columns import pack_text, unpack_text
from topics.log import Log, Producer

MAX_ENTRIES = 20_000  # per message
# Per message, well under Kafka's default 1 MiB request limit whatever the keys and values.
MAX_BYTES = 512 * 1024
FENCE = "ChangelogFence"


def write_changes(producer: Producer, topic: str, partition: int, applied: int,
                  changes: dict[str, list[tuple[str, str | None]]]) -> None:
    for table, entries in changes.items():
        for start in range(0, len(entries), MAX_ENTRIES):
            for value in _messages(table, applied, entries[start : start + MAX_ENTRIES]):
                producer.send(topic, partition, value)


def _messages(table: str, applied: int, part: list[tuple[str, str | None]]) -> list[bytes]:
    """The entries as one message, or as halves (recursively) while that is over MAX_BYTES."""
    kept = [(k, v) for k, v in part if v is not None]
    deleted = [k for k, v in part if v is None]
    value = encode("Changelog", {
        "table": table, "input_position": applied, "count": len(kept),
        "key_column": pack_text([k for k, _v in kept]),
        "value_column": pack_text([v for _k, v in kept]),  # type: ignore[misc]
        "deleted_count": len(deleted), "deleted_column": pack_text(deleted)})
    if len(value) <= MAX_BYTES or len(part) == 1:
        return [value]
    half = len(part) // 2
    return _messages(table, applied, part[:half]) + _messages(table, applied, part[half:])


def write_fence(producer: Producer, topic: str, partition: int, from_position: int) -> None:
    producer.send(topic, partition, encode(FENCE, {"from_position": from_position}))


def read_changes(log: Log, topic: str, partition: int
                 ) -> Iterator[tuple[str, int, list[str], list[str | None]]]:
    """(table, input position, keys, values) for every live changelog message, oldest
    first. Two passes: the first finds fences from message headers alone."""
    fences = [(msg.position, decode(msg.value)[1]["from_position"])
              for msg in log.read(topic, partition) if schema_name(msg.value) == FENCE]
    # void_from[i]: the lowest from_position of fences i.. (an entry is void if its stamp is
    # at or above that of any fence after it).
    void_from = [f for _p, f in fences]
    for i in range(len(void_from) - 2, -1, -1):
        void_from[i] = min(void_from[i], void_from[i + 1])
    next_fence = 0
    for msg in log.read(topic, partition):
        while next_fence < len(fences) and fences[next_fence][0] <= msg.position:
            next_fence += 1
        if schema_name(msg.value) == FENCE:
            continue
        _schema, value = decode(msg.value)
        if next_fence < len(fences) and value["input_position"] >= void_from[next_fence]:
            continue
        yield value["table"], value["input_position"], *_entries(value)


def _entries(value: dict[str, Any]) -> tuple[list[str], list[str | None]]:
    """Keys and their values (None: deleted), from the packed columns or an older writer's
    arrays. A key is set or deleted once per message, so the order between the two is free."""
    if not value["count"] and not value["deleted_count"]:
        return value["keys"], value["values"]
    keys = unpack_text(value["key_column"], value["count"])
    values: list[str | None] = unpack_text(value["value_column"], value["count"])  # type: ignore[assignment]
    deleted = unpack_text(value["deleted_column"], value["deleted_count"])
    return keys + deleted, values + [None] * len(deleted)

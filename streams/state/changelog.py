"""Changelog messages: a table partition's changes, stamped with the input position they
cover. Written after the outputs they produced are durable, read back by recovery."""

from __future__ import annotations

from collections.abc import Iterator

from topics.codec import decode, encode
from topics.log import Log, Producer

MAX_ENTRIES = 20_000  # per message, to keep messages well under broker size limits


def write_changes(producer: Producer, topic: str, partition: int, applied: int,
                  changes: dict[str, list[tuple[str, str | None]]]) -> None:
    for table, entries in changes.items():
        for start in range(0, len(entries), MAX_ENTRIES):
            part = entries[start : start + MAX_ENTRIES]
            producer.send(topic, partition, encode("Changelog", {
                "table": table, "input_position": applied,
                "keys": [k for k, _v in part], "values": [v for _k, v in part]}))


def read_changes(log: Log, topic: str, partition: int
                 ) -> Iterator[tuple[str, int, list[str], list[str | None]]]:
    """(table, input position, keys, values) for every changelog message, oldest first."""
    for msg in log.read(topic, partition):
        _schema, value = decode(msg.value)
        yield value["table"], value["input_position"], value["keys"], value["values"]

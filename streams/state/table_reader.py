"""Reads a processor's table from outside its workers (status queries, the importer's
duplicate check): restore each partition from the changelog, then fold the inputs that
came after the changelog's stamp. Pure folds make this safe: outputs are discarded."""

from __future__ import annotations

from typing import Any

from streams.api import Input, Processor
from streams.state.recovery import restore
from topics.codec import decode
from topics.log import Log


def read_table(log: Log, processor: Processor, table: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for partition in log.partitions(processor.input_topic):
        store = restore(log, processor.changelog_topic, partition, processor.tables)
        for msg in log.read(processor.input_topic, partition, after=store.applied):
            schema, value = decode(msg.value)
            processor.process(store.views, Input(schema, value, partition, msg.position,
                                                 msg.timestamp_ms))
        merged.update(store.data[table])
    return merged

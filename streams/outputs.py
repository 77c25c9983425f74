"""Sends processor outputs: encodes them and picks their partition."""

from __future__ import annotations

from streams.api import Output
from topics.codec import REGISTRY, encode
from topics.log import Log, Producer
from topics.partitioner import partition_for

# Output schemas that carry the replay epoch of the state that made them (sinks order
# values by (epoch, source stamp)).
EPOCH_SCHEMAS = frozenset(
    name for name, schema in REGISTRY.current.items()
    if any(f["name"] == "epoch" for f in schema.parsed.get("fields", ())))


class OutputWriter:
    def __init__(self, log: Log, producer: Producer):
        self.log = log
        self.producer = producer
        self._counts: dict[str, int] = {}

    def partitions(self, topic: str) -> int:
        count = self._counts.get(topic)
        if count is None:
            count = self._counts[topic] = len(self.log.partitions(topic))
        return count

    def send(self, out: Output, epoch: int = 0) -> None:
        """Encodes and buffers `out`; `epoch` goes into values whose schema has one."""
        key = out.key.encode("utf-8") if out.key is not None else None
        if out.partition is not None:
            partition = out.partition
        elif out.key is not None:
            partition = partition_for(out.key, self.partitions(out.topic))
        else:
            raise ValueError(f"output to {out.topic} has neither a partition nor a key")
        value = out.value
        if epoch and out.schema in EPOCH_SCHEMAS:
            value = {**value, "epoch": epoch}
        self.producer.send(out.topic, partition, encode(out.schema, value), key)

    def flush(self) -> None:
        self.producer.flush()

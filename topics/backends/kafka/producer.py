"""The producer: batched, idempotent, acknowledged by all in-sync replicas.

`send` only appends to kafka-python's accumulator (no per-record wait); a failed delivery
is recorded by an errback and reported by the next `flush`, which waits for everything sent
before it. Two rules of a real broker are enforced here, before anything is buffered, because
Tansu enforces neither and a real broker's refusal would only surface at flush: the message
size limit, and that a topic whose cleanup.policy includes compact refuses records without a
key. A topic's policy comes from the brokers (`cleanup_policy`, DescribeConfigs), asked once
per topic and only for a keyless record: the brokers' config is what a real broker enforces,
it covers topics that are not in topics.toml, and topics whose config was changed on the
cluster; the spec registry would be right only for topics this project created itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer

log_ = logging.getLogger(__name__)

# Room for the record batch header and record framing above the payload, so kafka-python's
# own request-size check never fires before ours.
FRAMING_BYTES = 1024
DEFAULTS: dict[str, Any] = {
    "linger_ms": 5,
    "batch_size": 512 * 1024,
}


class DeliveryError(RuntimeError):
    """Messages buffered since the last flush could not be delivered."""


class KafkaLogProducer:
    def __init__(self, bootstrap: str, options: dict[str, Any], max_request_size: int,
                 cleanup_policy: Callable[[str], str] | None = None):
        self.max_request_size = max_request_size
        self._cleanup_policy = cleanup_policy
        self._compacted: dict[str, bool] = {}  # topic -> its policy includes compact
        config = {**DEFAULTS, **options}
        config["max_request_size"] = max(config.get("max_request_size", 0),
                                         max_request_size + FRAMING_BYTES)
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                       enable_idempotence=True, **config)
        self._failures: list[tuple[str, int, BaseException]] = []
        self._closed = False

    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> None:
        size = len(value) + (len(key) if key is not None else 0)
        if size > self.max_request_size:
            raise ValueError(
                f"message to {topic}[{partition}] is {size:,} bytes, over the "
                f"{self.max_request_size:,}-byte limit (max_request_size); send smaller "
                "messages or raise the limit on the log and the brokers alike")
        if key is None and self._is_compacted(topic):
            raise ValueError(
                f"Compacted topic cannot accept message without key: {topic}[{partition}] has "
                "cleanup.policy=compact (Kafka refuses keyless records there); give every "
                "record a key")
        future = self._producer.send(topic, value=value, key=key, partition=partition)
        future.add_errback(self._failed, topic, partition)

    def _is_compacted(self, topic: str) -> bool:
        compacted = self._compacted.get(topic)
        if compacted is None:
            policy = self._cleanup_policy(topic) if self._cleanup_policy else "delete"
            compacted = self._compacted[topic] = "compact" in policy.split(",")
        return compacted

    def _failed(self, topic: str, partition: int, exc: BaseException) -> None:
        self._failures.append((topic, partition, exc))  # runs on kafka-python's sender thread

    def flush(self) -> None:
        self._producer.flush()
        if self._failures:
            failures, self._failures = self._failures, []
            topic, partition, exc = failures[0]
            raise DeliveryError(
                f"{len(failures)} message(s) were not delivered; the first, to "
                f"{topic}[{partition}], failed with {type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._producer.close()

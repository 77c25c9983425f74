"""The Kafka backend: the Log interface on a Kafka cluster, with kafka-python.

Positions are Kafka offsets. A committed position is the last processed offset: Kafka's
committed offset (the next to read) minus one.

Active members come from DescribeGroups (see admin.py for the Tansu workaround). A member
that leaves cleanly is gone at once. A member that dies is dropped by the coordinator after
its session timeout on Kafka; Tansu drops a dead member only when another member of the
group heartbeats, so on Tansu the last member of a group that was killed stays listed (and
`reset_group` keeps refusing) until a worker of that group runs again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence

from kafka import TopicPartition as KafkaTP
from kafka.record import util as kafka_record_util

from topics.backends.kafka.admin import Admin
from topics.backends.kafka.consumer import GroupConsumer, ours, theirs
from topics.backends.kafka.options import split_options
from topics.backends.kafka.producer import KafkaLogProducer
from topics.backends.kafka.reader import Readers
from topics.log import (
    GroupBusyError,
    GroupPosition,
    Message,
    PartitionInfo,
    RebalanceListener,
    TopicPartition,
    scan_first_since,
)
from topics.spec import TopicSpec

log_ = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_SIZE = 1024 * 1024


class KafkaLog:
    def __init__(self, bootstrap: str, kafka_options: Mapping[str, object] | None = None,
                 session_timeout_ms: int | None = None,
                 heartbeat_interval_ms: int | None = None,
                 max_poll_interval_ms: int | None = None,
                 replication_factor: int = 1,
                 max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
                 topic_wait_s: float = 10.0):
        if not bootstrap:
            raise ValueError("kafka backend: no bootstrap servers; expected "
                             "kafka://HOST:PORT[,HOST:PORT]")
        self.bootstrap = bootstrap
        self.url = f"kafka://{bootstrap}"
        if kafka_record_util.crc32c_c is None:
            log_.warning("the crc32c package is not installed: kafka-python checksums record "
                         "batches in pure Python, about 30x slower (pip install crc32c)")
        self.max_request_size = self.max_message_bytes = max_request_size
        self._options = split_options(kafka_options)
        group = {"session_timeout_ms": session_timeout_ms,
                 "heartbeat_interval_ms": heartbeat_interval_ms,
                 "max_poll_interval_ms": max_poll_interval_ms}
        self._group_options = {**self._options["consumer"],
                               **{k: v for k, v in group.items() if v is not None}}
        timeout_s = self._options["consumer"].get("request_timeout_ms", 30_000) / 1000
        self._admin = Admin(bootstrap, self._options["admin"], replication_factor, topic_wait_s)
        self._readers = Readers(bootstrap, self._options["consumer"], timeout_s)
        self._clients: list[KafkaLogProducer | GroupConsumer] = []

    # -- topics ---------------------------------------------------------------------------
    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        self._admin.ensure_topics(specs)

    def partitions(self, topic: str) -> list[int]:
        return self._admin.partitions(topic)

    # -- clients --------------------------------------------------------------------------
    def producer(self) -> KafkaLogProducer:
        producer = KafkaLogProducer(self.bootstrap, self._options["producer"],
                                    self.max_request_size, self._admin.cleanup_policy)
        self._clients.append(producer)
        return producer

    def consumer(self, group: str, topics: Sequence[str], listener: RebalanceListener,
                 member: str = "") -> GroupConsumer:
        member = member or f"{socket.gethostname()}-{os.getpid()}"
        consumer = GroupConsumer(self.bootstrap, group, topics, listener, member,
                                 self._group_options)
        self._clients.append(consumer)
        return consumer

    def read(self, topic: str, partition: int, after: int | None = None) -> Iterator[Message]:
        with self._readers.take() as reader:
            yield from reader.read(topic, partition, 0 if after is None else after + 1)

    def truncated(self, topic: str, partition: int) -> bool:
        tp = KafkaTP(topic, partition)
        with self._readers.take() as reader:
            return reader.beginnings([tp])[tp] > 0  # the log start offset moved past 0

    def read_at(self, topic: str, partition: int, position: int) -> Message:
        with self._readers.take() as reader:
            return reader.read_at(topic, partition, position)

    def first_since(self, topic: str, partition: int, since_ms: int) -> int | None:
        return scan_first_since(self, topic, partition, since_ms)

    # -- inspection and admin -------------------------------------------------------------
    def _ends(self, tps: list[KafkaTP]) -> tuple[dict[KafkaTP, int], dict[KafkaTP, int]]:
        """(beginning offset, high watermark) per partition."""
        with self._readers.take() as reader:
            return reader.beginnings(tps), reader.highwaters(tps)

    def describe(self, topic: str) -> list[PartitionInfo]:
        tps = [KafkaTP(topic, p) for p in self.partitions(topic)]
        firsts, ends = self._ends(tps)
        out = []
        for tp in tps:
            first, end = firsts[tp], ends[tp]
            if end > first:
                out.append(PartitionInfo(topic, tp.partition, first, end - 1, end - first))
            else:
                out.append(PartitionInfo(topic, tp.partition, None, None, 0))
        return out

    def groups(self) -> list[str]:
        return self._admin.groups()

    def group_positions(self, group: str) -> list[GroupPosition]:
        committed = self._admin.committed(group)
        topics = sorted({tp.topic for tp in committed})
        tps = [KafkaTP(t, p) for t in topics for p in self.partitions(t)]
        firsts, ends = self._ends(tps)
        owners: dict[KafkaTP, str] = {}
        for member in self._admin.members(group):
            for tp in member.partitions or ():
                owners[tp] = member.name
        out = []
        for tp in tps:
            offset = committed.get(tp)
            position = None if offset is None or offset <= 0 else offset - 1
            lag = max(0, ends[tp] - (firsts[tp] if offset is None else max(offset, firsts[tp])))
            out.append(GroupPosition(group, ours([tp])[0], position, lag, owners.get(tp)))
        return out

    def active_members(self, group: str) -> list[str]:
        return sorted(m.name for m in self._admin.members(group))

    def reset_group(self, group: str, positions: dict[TopicPartition, int | None]) -> None:
        live = self.active_members(group)
        if live:
            raise GroupBusyError(
                f"group {group} has running members ({', '.join(live)}); stop its workers first")
        starts = [theirs(tp) for tp, position in positions.items() if position is None]
        with self._readers.take() as reader:
            firsts = reader.beginnings(starts)
        offsets = {theirs(tp): firsts[theirs(tp)] if position is None else position + 1
                   for tp, position in positions.items()}
        if offsets:
            self._admin.set_committed(group, offsets)

    def close(self) -> None:
        """Closes every client it opened: consumers first (they revoke, and the runtime
        checkpoints through a producer), then producers, readers and the admin client."""
        clients, self._clients = self._clients, []
        clients.sort(key=lambda c: not isinstance(c, GroupConsumer))
        for client in [*clients, self._readers, self._admin]:
            try:
                client.close()
            except Exception:  # closing the rest matters more than one client's failure
                log_.exception("closing %s failed", type(client).__name__)

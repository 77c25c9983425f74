"""The small interface every backend (embedded, kafka, kinesis) implements.

Positions are opaque, comparable integers. They are NOT dense: the embedded log uses byte
offsets, Kinesis uses sequence numbers. Code above this layer never computes "position + 1";
it commits the last position it processed and the backend resumes after it. Partitions may
appear over time (Kinesis resharding), so callers ask for them rather than assume them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from topics.spec import TopicSpec


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    position: int
    value: bytes
    key: bytes | None = None
    timestamp_ms: int = 0

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    topic: str
    partition: int
    first_position: int | None  # None when empty
    last_position: int | None
    messages: int


@dataclass(frozen=True, slots=True)
class GroupPosition:
    group: str
    tp: TopicPartition
    committed: int | None  # last processed position
    lag: int  # messages after `committed`
    owner: str | None  # member holding the partition now, if known


class TopicError(Exception):
    """A topic is missing or does not match its spec (e.g. partition counts differ)."""


class GroupBusyError(Exception):
    """An operation needs the group's workers stopped, and some are running."""


class RebalanceListener(Protocol):
    """Called inside `poll`. A listener may also define `on_lost(tps)`: partitions taken
    away without a clean revoke (session expired, lease taken); nothing of them may become
    durable. Without it, `on_revoked` is called instead."""

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None: ...

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None: ...


class Producer(Protocol):
    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> None:
        """Buffers a message; it is acknowledged (durable) once `flush` returns."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class Consumer(Protocol):
    def assignment(self) -> set[TopicPartition]: ...

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Messages of owned partitions in position order per partition. Rebalance callbacks
        run inside poll, before any message of a newly assigned partition is returned."""

    def seek_after(self, tp: TopicPartition, position: int | None) -> None:
        """Next poll returns messages after `position` (None: from the beginning)."""

    def commit(self, positions: dict[TopicPartition, int],
               metadata: dict[TopicPartition, str] | None = None) -> None:
        """Records the last processed position per partition, durably, with an optional
        short string stored beside it (Kafka's commit metadata)."""

    def committed(self, tp: TopicPartition) -> int | None: ...

    def committed_metadata(self, tp: TopicPartition) -> str:
        """The metadata of the last commit ("" if none, or after a reset)."""

    def close(self) -> None: ...


class Log(Protocol):
    url: str
    max_message_bytes: int  # the largest value its producers accept

    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Creates missing topics; raises TopicError when one exists with other partitions."""

    def partitions(self, topic: str) -> list[int]: ...

    def producer(self) -> Producer: ...

    def consumer(
        self, group: str, topics: Sequence[str], listener: RebalanceListener, member: str = ""
    ) -> Consumer: ...

    def read(
        self, topic: str, partition: int, after: int | None = None
    ) -> Iterator[Message]:
        """Reads one partition from after `after` to the end seen when reading started
        (changelog restore, status views). Needs no group and takes no ownership."""

    def truncated(self, topic: str, partition: int) -> bool:
        """True when messages at the start of the partition are gone (retention deleted
        them): a reader from the start does not see the whole history."""

    def read_at(self, topic: str, partition: int, position: int) -> Message:
        """The message at `position` (a sink reads the stamp of its last commit)."""

    def first_since(self, topic: str, partition: int, since_ms: int) -> int | None:
        """Position of the partition's first message appended at or after `since_ms` (epoch
        ms by the log's own clock: Kinesis's arrival times), None when there is none."""

    def describe(self, topic: str) -> list[PartitionInfo]: ...

    def groups(self) -> list[str]: ...

    def group_positions(self, group: str) -> list[GroupPosition]: ...

    def active_members(self, group: str) -> list[str]: ...

    def reset_group(self, group: str, positions: dict[TopicPartition, int | None]) -> None:
        """Sets committed positions (None: before the first message) and clears their
        metadata. Raises GroupBusyError while members of the group are running."""

    def close(self) -> None: ...


def scan_first_since(log: Log, topic: str, partition: int, since_ms: int) -> int | None:
    """`first_since` by reading the partition from its start (a log with no time index)."""
    for msg in log.read(topic, partition):
        if msg.timestamp_ms >= since_ms:
            return msg.position
    return None

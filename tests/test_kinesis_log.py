"""The Log contract on the Kinesis backend, against kinesalite (streams, shards, resharding)
and the moto server (the DynamoDB lease table): topics, producing with KPL aggregation,
reads, positions, leases (take, renew, expire, release, balance), commits and resharding."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.aws_server import moto_endpoint, unique_name  # noqa: F401
from tests.kinesis_server import kinesis_endpoint, kinesis_env  # noqa: F401
from topics.backends import open_log
from topics.backends.kinesis.log import KinesisLog
from topics.backends.kinesis.positions import unpack
from topics.log import GroupBusyError, Message, TopicError, TopicPartition
from topics.spec import TopicSpec

WAIT_S = 30.0
FAILOVER_MS = 1500


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S,
               step: Callable[[], object] | None = None) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def log(kinesis_env: dict[str, str]) -> Iterator[KinesisLog]:
    opened = open_log("kinesis://", kinesis_prefix=unique_name("t") + ".",
                      kinesis_lease_table=unique_name("leases"),
                      kinesis_failover_ms=FAILOVER_MS)
    assert isinstance(opened, KinesisLog)
    try:
        yield opened
    finally:
        opened.close()


def new_topic(log: KinesisLog, partitions: int = 4, shards: int = 2) -> str:
    name = "topic"
    log.streams.options = type(log.options)(**{**_fields(log.options), "shards": shards})
    log.ensure_topics([TopicSpec(name, partitions, ("X",))])
    return name


def _fields(options: object) -> dict[str, object]:
    return {f: getattr(options, f) for f in options.__slots__}  # type: ignore[attr-defined]


def produce(log: KinesisLog, topic: str, counts: dict[int, int], tag: str = "v") -> None:
    producer = log.producer()
    for i in range(max(counts.values())):
        for partition, n in counts.items():
            if i < n:
                producer.send(topic, partition, f"{tag}{partition}-{i}".encode(), b"k%d" % i)
    producer.flush()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, list[TopicPartition]]] = []
        self.lock = threading.Lock()
        self.on_revoked_hook: Callable[[list[TopicPartition]], None] | None = None

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            self.events.append(("assigned", list(tps)))

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        if self.on_revoked_hook is not None:
            self.on_revoked_hook(list(tps))
        with self.lock:
            self.events.append(("revoked", list(tps)))

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            self.events.append(("lost", list(tps)))

    def kinds(self) -> list[str]:
        with self.lock:
            return [kind for kind, _ in self.events]


def by_partition(messages: Sequence[Message]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for m in messages:
        out.setdefault(m.partition, []).append(m.value)
    return out


def expected(counts: dict[int, int], tag: str = "v") -> dict[int, list[bytes]]:
    return {p: [f"{tag}{p}-{i}".encode() for i in range(n)] for p, n in counts.items() if n}


# -- topics and reads ---------------------------------------------------------------------

def test_topics_record_their_virtual_partitions_and_refuse_another_count(
        log: KinesisLog) -> None:
    topic = new_topic(log, partitions=6, shards=2)
    assert log.partitions(topic) == list(range(6))
    log.ensure_topics([TopicSpec(topic, 6, ("X",))])  # again: fine
    with pytest.raises(TopicError, match="6 virtual partitions"):
        log.ensure_topics([TopicSpec(topic, 4, ("X",))])


def test_produce_and_read_each_virtual_partition_in_order(log: KinesisLog) -> None:
    topic = new_topic(log, partitions=4, shards=2)
    counts = {0: 50, 1: 0, 2: 7, 3: 120}
    produce(log, topic, counts)
    for p, n in counts.items():
        got = list(log.read(topic, p))
        assert [m.value for m in got] == expected(counts).get(p, [])
        assert [m.key for m in got] == [b"k%d" % i for i in range(n)]
        positions = [m.position for m in got]
        assert positions == sorted(positions) and len(set(positions)) == n
        if got:
            middle = got[len(got) // 2]
            assert [m.value for m in log.read(topic, p, middle.position)] == \
                [m.value for m in got[len(got) // 2 + 1:]]
            assert log.read_at(topic, p, middle.position).value == middle.value
    assert [i.messages for i in log.describe(topic)] == [50, 0, 7, 120]
    assert not log.truncated(topic, 0)

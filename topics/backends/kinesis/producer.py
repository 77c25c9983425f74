"""The producer: KPL-aggregated records, one aggregator per predicted shard.

Every message is one KPL sub-record `encode(v, key, value)` with the explicit hash key
`hash_key_of(v, n)` of its virtual partition. Sub-records are aggregated per shard, the shard
predicted from a ListShards map (the open shard whose range holds the hash key), so every
sub-record of an aggregate lies inside the range of the shard the aggregate is put to:
consumers (ours and the KCL) drop sub-records outside their shard's range.

PutRecords calls carry at most 500 records and 5 MiB, and at most ONE aggregate per shard:
a call may fail some entries and not others, and with two aggregates of one shard in a call
the later could succeed while the earlier failed, putting the earlier's messages after the
later's. One aggregate per shard per call, retried until it lands, keeps every virtual
partition's messages in send order. Only failed entries are retried, after a backoff when
Kinesis throttled (ProvisionedThroughputExceededException).

Resharding while producing: when an aggregate lands in another shard than predicted (its
predicted shard was split or merged), the map is refreshed. The sub-records of that aggregate
that lie outside the shard it landed in are lost to consumers, so they are sent again, ahead
of every later message of their virtual partitions: they, the rest of that shard's queue and
its open aggregate are re-aggregated for the new shards, in order, at the front of the queues.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aws_kinesis_agg.aggregator import RecordAggregator

from topics.backends.kinesis.envelope import encode, hash_key_of
from topics.backends.kinesis.streams import Shard, Streams

log_ = logging.getLogger(__name__)

RECORD_LIMIT = 1 << 20  # a record's data + partition key
CALL_RECORDS = 500
CALL_BYTES = 5 << 20
AGGREGATE_BYTES = RECORD_LIMIT - 256  # room for the aggregate's partition key
# The largest message value: the record limit less the envelope, a key of a few hundred
# bytes and the aggregate's framing (magic, protobuf tables, MD5).
MAX_MESSAGE_BYTES = RECORD_LIMIT - 1024
QUEUED_BYTES = 16 << 20  # aggregates held before `send` starts putting them
STALL_S = 120.0  # no entry acknowledged this long: the flush fails
THROTTLED = "ProvisionedThroughputExceededException"


class DeliveryError(RuntimeError):
    """Messages buffered since the last flush could not be delivered."""


Sub = tuple[str, bytes, int]  # (partition key, data, explicit hash key)


@dataclass
class _Aggregate:
    subs: list[Sub]
    pk: str
    ehk: int
    data: bytes


@dataclass
class _Open:
    """A shard's aggregate being filled, and the sub-records in it."""

    agg: RecordAggregator = field(default_factory=lambda: RecordAggregator(AGGREGATE_BYTES))
    subs: list[Sub] = field(default_factory=list)


def _contents(record: Any, subs: list[Sub]) -> _Aggregate:
    pk, ehk, data = record.get_contents()
    return _Aggregate(subs, pk, int(ehk), data)


class KinesisProducer:
    def __init__(self, client: Any, streams: Streams):
        self.client = client
        self.streams = streams
        self._maps: dict[str, list[Shard]] = {}  # topic -> open shards
        self._open: dict[tuple[str, str], _Open] = {}  # (topic, shard id) -> its aggregate
        self._queues: dict[tuple[str, str], deque[_Aggregate]] = {}
        self._queued = 0
        self.calls = 0  # PutRecords calls made (for tests and measurements)
        self.retried = 0  # entries put again after a failure

    # -- the shard map --------------------------------------------------------------------
    def _shards(self, topic: str) -> list[Shard]:
        shards = self._maps.get(topic)
        if shards is None:
            shards = self._maps[topic] = [s for s in self.streams.shards(topic)
                                          if not s.closed]
        return shards

    def _predict(self, topic: str, hash_key: int) -> Shard:
        for shard in self._shards(topic):
            if shard.holds(hash_key):
                return shard
        raise RuntimeError(f"no open shard of {self.streams.name(topic)} holds hash key "
                           f"{hash_key}")

    # -- sending --------------------------------------------------------------------------
    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> None:
        data = encode(partition, key, value)
        if len(data) > RECORD_LIMIT - 512:
            raise ValueError(
                f"message to {topic}[{partition}] is {len(data):,} bytes, over the "
                f"{MAX_MESSAGE_BYTES:,}-byte limit of a Kinesis record; send smaller messages")
        hash_key = hash_key_of(partition, self.streams.partition_count(topic))
        self._add(topic, (str(partition), data, hash_key))
        if self._queued >= QUEUED_BYTES:
            self._drain()

    def _add(self, topic: str, sub: Sub, front: list[_Aggregate] | None = None) -> None:
        shard = self._predict(topic, sub[2])
        where = (topic, shard.id)
        current = self._open.setdefault(where, _Open())
        full = current.agg.add_user_record(sub[0], sub[1], str(sub[2]))
        if full is None:
            current.subs.append(sub)
            return
        self._queue(where, _contents(full, current.subs))
        current.subs = [sub]

    def _queue(self, where: tuple[str, str], aggregate: _Aggregate) -> None:
        self._queues.setdefault(where, deque()).append(aggregate)
        self._queued += len(aggregate.data)

    def _seal(self) -> None:
        for where, current in list(self._open.items()):
            if current.subs:
                self._queue(where, _contents(current.agg.clear_and_get(), current.subs))
            del self._open[where]

    def flush(self) -> None:
        self._seal()
        self._drain()

    def close(self) -> None:
        self.flush()

    # -- putting --------------------------------------------------------------------------
    def _drain(self) -> None:
        """Puts every queued aggregate; returns when all are acknowledged."""
        backoff = 0.05
        progress = time.monotonic()
        while any(self._queues.values()):
            throttled = False
            for topic in sorted({t for (t, _), q in self._queues.items() if q}):
                landed, throttle = self._put_round(topic)
                throttled = throttled or throttle
                if landed:
                    progress = time.monotonic()
            if time.monotonic() - progress > STALL_S:
                raise DeliveryError(f"no record was acknowledged by Kinesis for {STALL_S:.0f}s; "
                                    f"{sum(map(len, self._queues.values()))} aggregate(s) "
                                    "undelivered")
            if throttled:
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.05

    def _put_round(self, topic: str) -> tuple[int, bool]:
        """One PutRecords call with the head aggregate of each shard queue of `topic`
        (within the call's limits). Returns (aggregates landed, any throttled)."""
        heads: list[tuple[tuple[str, str], _Aggregate]] = []
        size = 0
        for where, queue in sorted(self._queues.items()):
            if where[0] != topic or not queue:
                continue
            head = queue[0]
            if heads and (len(heads) >= CALL_RECORDS or size + len(head.data) > CALL_BYTES):
                break
            heads.append((where, head))
            size += len(head.data) + len(head.pk)
        self.calls += 1
        answer = self.client.put_records(
            StreamName=self.streams.name(topic),
            Records=[{"Data": a.data, "PartitionKey": a.pk, "ExplicitHashKey": str(a.ehk)}
                     for _, a in heads])
        landed, throttled, moved = 0, False, []
        for (where, aggregate), entry in zip(heads, answer["Records"], strict=True):
            code = entry.get("ErrorCode")
            if code:
                self.retried += 1
                throttled = throttled or code == THROTTLED
                log_.debug("put to %s failed (%s: %s); retrying", where[1], code,
                           entry.get("ErrorMessage"))
                continue
            self._queues[where].popleft()
            self._queued -= len(aggregate.data)
            landed += 1
            if entry["ShardId"] != where[1]:
                moved.append((where, aggregate, entry["ShardId"]))
        for where, aggregate, shard_id in moved:
            self._rerouted(where, aggregate, shard_id)
        return landed, throttled

    def _rerouted(self, where: tuple[str, str], aggregate: _Aggregate, shard_id: str) -> None:
        """An aggregate for shard where[1] landed in `shard_id`: the map is out of date."""
        topic = where[0]
        self._maps.pop(topic, None)
        landed = next((s for s in self.streams.shards(topic) if s.id == shard_id), None)
        lost = [s for s in aggregate.subs if landed is None or not landed.holds(s[2])]
        log_.info("%s: an aggregate for %s landed in %s (resharded); refreshing the shard map "
                  "and re-sending %d sub-record(s) outside %s", self.streams.name(topic),
                  where[1], shard_id, len(lost), shard_id)
        # Everything bound for a shard that is no longer open (or for the mispredicted
        # one), in order: the lost sub-records first, then each old shard's queued
        # aggregates, then its open one. It goes ahead of anything queued for the new
        # shards (nothing is: those were not predicted before).
        redo = list(lost)
        open_now = {s.id for s in self._shards(topic)}
        old = sorted({w for w in [*self._queues, *self._open]
                      if w[0] == topic and (w == where or w[1] not in open_now)})
        for w in old:
            for queued in self._queues.pop(w, deque()):
                redo.extend(queued.subs)
                self._queued -= len(queued.data)
            current = self._open.pop(w, None)
            if current is not None:
                redo.extend(current.subs)
        for sub in redo:
            self._add(topic, sub)

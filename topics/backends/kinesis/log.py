"""KinesisLog: the Log interface on Kinesis Data Streams, leases in DynamoDB.

    kinesis://[?prefix=P&lease_table=T&failover_ms=MS&shards=N&on_demand=1]

A topic is the stream `<prefix><topic>`; its partitions are its virtual partitions
(envelope.py), fixed when the topic is made, whatever its shards do. A group is the lease
table `<lease_table>.<group>` (the KCL keeps one table per application). Positions are
positions.py's ints.

`read` of a virtual partition reads the shards that held its hash key, oldest first, from
after `after`, each closed one to its end and the open one to its tip (an answer that is
empty and 0 ms behind). `truncated` is True when the oldest shard of that lineage still
listed has a parent that is not (Kinesis dropped it after the retention period), or when the
stream is older than its retention period (its first records may be gone).
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from topics.backends.kinesis import seek
from topics.backends.kinesis.consumer import KinesisConsumer
from topics.backends.kinesis.envelope import hash_key_of
from topics.backends.kinesis.lag import millis_behind
from topics.backends.kinesis.leases import Commit, LeaseTable
from topics.backends.kinesis.options import KinesisOptions, parse
from topics.backends.kinesis.positions import unpack
from topics.backends.kinesis.producer import MAX_MESSAGE_BYTES, KinesisProducer
from topics.backends.kinesis.records import ShardCursor, read_shard
from topics.backends.kinesis.shard_sync import commit_of, newest, stream_leases, sync
from topics.backends.kinesis.streams import Shard, Streams, chain
from topics.log import (
    GroupBusyError,
    GroupPosition,
    Message,
    PartitionInfo,
    RebalanceListener,
    TopicError,
    TopicPartition,
)
from topics.spec import TopicSpec

log_ = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
_TABLE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def client(service: str) -> Any:
    """A boto3 client: credentials and region from boto3's chain, the endpoint from
    AWS_ENDPOINT_URL_<SERVICE> / AWS_ENDPOINT_URL (boto3 reads them itself), standard retries
    (throttling and 5xx, with backoff)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - the aws extra is not installed
        raise ValueError("the kinesis backend needs boto3 and aws-kinesis-agg; pip install "
                         "'audience-streams[aws]'") from None
    config = Config(retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS})
    return boto3.session.Session().client(service, config=config)


class KinesisLog:
    def __init__(self, url: str = "kinesis://", **options: object):
        self.options: KinesisOptions = parse(url, options)
        self.url = url
        self.max_message_bytes = MAX_MESSAGE_BYTES
        from botocore.exceptions import NoRegionError

        try:
            self.kinesis = client("kinesis")
            self.dynamodb = client("dynamodb")
        except NoRegionError:
            raise ValueError("--backend kinesis: no AWS region; set AWS_REGION (or "
                             "AWS_DEFAULT_REGION, or a region in the AWS profile)") from None
        self.streams = Streams(self.kinesis, self.options)
        self._clients: list[KinesisProducer | KinesisConsumer] = []
        # lease table -> (monotonic time, {lease key: (owner, counter)}): active_members
        self._observed: dict[str, tuple[float, dict[str, tuple[str | None, int]]]] = {}

    # -- topics ---------------------------------------------------------------------------
    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.streams.ensure(specs)
        except (BotoCoreError, ClientError) as exc:  # unreachable, no credentials, denied
            raise TopicError(f"kinesis: cannot create or check the streams: {exc}") from None

    def partitions(self, topic: str) -> list[int]:
        return list(range(self.streams.partition_count(topic)))

    # -- clients --------------------------------------------------------------------------
    def producer(self) -> KinesisProducer:
        producer = KinesisProducer(self.kinesis, self.streams)
        self._clients.append(producer)
        return producer

    def table(self, group: str) -> LeaseTable:
        return LeaseTable(self.dynamodb, _TABLE_CHARS.sub("-", f"{self.options.lease_table}."
                                                               f"{group}"))

    def consumer(self, group: str, topics: Sequence[str], listener: RebalanceListener,
                 member: str = "") -> KinesisConsumer:
        consumer = KinesisConsumer(self.kinesis, self.streams, self.table(group), group,
                                   topics, listener, member, self.options.failover_s)
        self._clients.append(consumer)
        return consumer

    # -- reads ----------------------------------------------------------------------------
    def _lineage(self, topic: str, partition: int) -> tuple[list[Shard], int]:
        count = self.streams.partition_count(topic)
        if not 0 <= partition < count:
            raise TopicError(f"{topic}[{partition}]: no such partition (0..{count - 1})")
        hash_key = hash_key_of(partition, count)
        return chain(self.streams.shards(topic), hash_key), hash_key

    def read(self, topic: str, partition: int, after: int | None = None) -> Iterator[Message]:
        lineage, _ = self._lineage(topic, partition)
        start = -1 if after is None else unpack(after).shard
        stream = self.streams.name(topic)
        for shard in lineage:
            if shard.index < start:
                continue
            cursor = ShardCursor(self.kinesis, stream, topic, shard, after)
            for msg in read_shard(cursor):
                if msg.partition == partition:
                    yield msg

    def read_at(self, topic: str, partition: int, position: int) -> Message:
        at = unpack(position)
        lineage, _ = self._lineage(topic, partition)
        shard = next((s for s in lineage if s.index == at.shard), None)
        if shard is not None:
            cursor = ShardCursor(self.kinesis, self.streams.name(topic), topic, shard)
            cursor.start_at(position)
            for _ in range(3):  # the record is in the first answers from its sequence number
                for msg in cursor.fetch().messages:
                    if msg.position == position and msg.partition == partition:
                        return msg
                    if msg.position > position:
                        break
        raise TopicError(f"{topic}[{partition}]: no message at position {position}")

    def first_since(self, topic: str, partition: int, since_ms: int) -> int | None:
        return seek.first_since(self.kinesis, self.streams, topic, partition, since_ms)

    def starts_at_sequence(self, topic: str, sequence: str) -> dict[int, int | None]:
        """Where `--from sequence:SEQ` starts each virtual partition (seek.py)."""
        return seek.starts_at_sequence(self.kinesis, self.streams, topic, sequence)

    def truncated(self, topic: str, partition: int) -> bool:
        lineage, _ = self._lineage(topic, partition)
        listed = {s.id for s in self.streams.shards(topic)}
        if lineage and any(p not in listed for p in lineage[0].parents):
            return True
        summary = self.kinesis.describe_stream_summary(
            StreamName=self.streams.name(topic))["StreamDescriptionSummary"]
        created = summary["StreamCreationTimestamp"]
        age = datetime.datetime.now(datetime.UTC) - created
        return bool(age > datetime.timedelta(hours=summary["RetentionPeriodHours"]))

    # -- inspection and admin -------------------------------------------------------------
    def describe(self, topic: str) -> list[PartitionInfo]:
        out = []
        for p in self.partitions(topic):
            first = last = None
            n = 0
            for msg in self.read(topic, p):
                first = msg.position if first is None else first
                last = msg.position
                n += 1
            out.append(PartitionInfo(topic, p, first, last, n))
        return out

    def shard_view(self, topic: str, group: str | None = None) -> list[dict[str, Any]]:
        """Shards with their lineage, hash ranges and, for a group, lease owner,
        checkpoint and the checkpoint's lag in ms (`millis_behind`, lag.py; None without a
        lease) (`streams topics` on Kinesis)."""
        stream = self.streams.name(topic)
        leases = stream_leases(self.table(group).scan(), stream) \
            if group and self.table(group).exists() else {}
        out = []
        for shard in self.streams.shards(topic):
            lease = leases.get(shard.id)
            out.append({"shard": shard.id, "parents": list(shard.parents),
                        "hash_range": [str(shard.start), str(shard.end)],
                        "closed": shard.closed,
                        "owner": lease.owner if lease else None,
                        "checkpoint": lease.checkpoint if lease else None,
                        "millis_behind": millis_behind(self.kinesis, stream, lease)
                        if lease else None})
        return out

    def groups(self) -> list[str]:
        prefix = f"{self.options.lease_table}."
        names: list[str] = []
        args: dict[str, Any] = {}
        while True:
            page = self.dynamodb.list_tables(**args)
            names.extend(n[len(prefix):] for n in page["TableNames"] if n.startswith(prefix))
            if "LastEvaluatedTableName" not in page:
                return sorted(names)
            args["ExclusiveStartTableName"] = page["LastEvaluatedTableName"]

    def group_positions(self, group: str) -> list[GroupPosition]:
        table = self.table(group)
        if not table.exists():
            return []
        leases = table.scan()
        by_name = {self.streams.name(t): t for t in self._topics_of(leases)}
        out = []
        for stream, topic in sorted(by_name.items()):
            by_shard = stream_leases(leases, stream)
            count = self.streams.partition_count(topic)
            for v in range(count):
                commit = commit_of(by_shard, v, count)
                committed = None if commit is None else commit.position
                holder = newest(by_shard, hash_key_of(v, count))
                lag = sum(1 for _ in self.read(topic, v, committed))
                out.append(GroupPosition(group, TopicPartition(topic, v), committed, lag,
                                         holder.owner if holder else None))
        return out

    def _topics_of(self, leases: Mapping[str, Any]) -> list[str]:
        prefix = self.options.prefix
        return sorted({lease.stream[len(prefix):] for lease in leases.values()
                       if lease.stream.startswith(prefix)})

    def active_members(self, group: str) -> list[str]:
        """Owners whose leases are renewed: a lease's counter moves at least once per
        renewal interval (failover/3) while its owner runs, so a scan compared with one at
        least that much older tells (no clocks of other hosts are compared). The first
        call observes every group's table, so asking about each group in turn (replay)
        waits once, not once per group."""
        table = self.table(group)
        if not table.exists():
            return []
        interval = self.options.failover_s / 3 * 1.5
        seen = self._observed.get(table.name)
        now = time.monotonic()
        if seen is None or now - seen[0] > 10 * interval:
            for name in [self.table(g).name for g in self.groups()]:
                self._observe(LeaseTable(self.dynamodb, name))
            seen = self._observed.get(table.name) or self._observe(table)
        wait = interval - (time.monotonic() - seen[0])
        owned = {k: (owner, counter) for k, (owner, counter) in seen[1].items() if owner}
        if not owned:
            return []
        if wait > 0:
            time.sleep(wait)
        now_seen = self._observe(table)[1]
        return sorted({owner for k, (owner, counter) in now_seen.items()
                       if owner and k in owned and counter != owned[k][1]})

    def _observe(self, table: LeaseTable) -> tuple[float, dict[str, tuple[str | None, int]]]:
        """(when, {lease key: (owner, counter)}) of the table now; the previous observation
        is kept while it is younger than the renewal interval."""
        taken = time.monotonic()
        counters = {k: (lease.owner, lease.counter)
                    for k, lease in table.scan(members=True).items()}
        previous = self._observed.get(table.name)
        interval = self.options.failover_s / 3 * 1.5
        if previous is None or taken - previous[0] >= interval:
            self._observed[table.name] = (taken, counters)
        return taken, counters

    def reset_group(self, group: str, positions: dict[TopicPartition, int | None]) -> None:
        live = self.active_members(group)
        if live:
            raise GroupBusyError(
                f"group {group} has running members ({', '.join(live)}); stop its workers first")
        table = self.table(group)
        table.ensure()
        leases = table.scan()
        for topic in sorted({tp.topic for tp in positions}):
            stream = self.streams.name(topic)
            count = self.streams.partition_count(topic)
            if sync(table, stream, self.streams.shards(topic), count, leases):
                leases = table.scan()
            by_shard = stream_leases(leases, stream)
            for tp, position in positions.items():
                if tp.topic != topic:
                    continue
                holder = newest(by_shard, hash_key_of(tp.partition, count))
                if holder is None:
                    raise TopicError(f"{tp}: no lease holds it in {table.name}")
                table.put_commits(holder.key, {tp.partition: Commit(position, "")})

    def close(self) -> None:
        """Closes consumers first (they revoke, and the runtime checkpoints through a
        producer), then producers."""
        clients, self._clients = self._clients, []
        clients.sort(key=lambda c: not isinstance(c, KinesisConsumer))
        for c in clients:
            try:
                c.close()
            except Exception:  # closing the rest matters more than one client's failure
                log_.exception("closing %s failed", type(c).__name__)

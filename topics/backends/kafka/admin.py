"""Topic and group administration through KafkaAdminClient.

Topics are created with their spec's cleanup.policy, retention.ms and retention.bytes
(`topic_configs`); "keep forever" is said explicitly (-1), or the broker's default (7 days)
would apply. `cleanup_policy` reads a topic's policy back from the broker, for the producer.

DescribeGroups: kafka-python asks for the groups' authorized operations and turns the
returned bit field into ACL enum members; Tansu sets bits kafka-python has no member for,
so the stock `describe_groups` raises ValueError on Tansu. `_Client` drops that field
(nothing here uses it) and the rest of the answer is used as it is.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient
from kafka import TopicPartition as KafkaTP
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, for_code
from kafka.structs import OffsetAndMetadata

from topics.log import TopicError
from topics.spec import SPECS, TopicSpec

log_ = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
# Brokers name a member "<client id>-<uuid>"; the client id is the member name we chose.
_MEMBER_SUFFIX = re.compile(r"-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    """The Kafka topic configs of a spec (segment_bytes is the embedded log's own)."""
    return {"cleanup.policy": spec.cleanup,
            "retention.ms": str(-1 if spec.retention_ms is None else spec.retention_ms),
            "retention.bytes": str(-1 if spec.retention_bytes is None
                                   else spec.retention_bytes)}


class _Client(KafkaAdminClient):
    def _process_acl_operations(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj.pop("authorized_operations", None)
        return obj


@dataclass(frozen=True)
class Member:
    name: str  # the client id the member joined with (the runtime's member name)
    partitions: tuple[KafkaTP, ...] | None  # None when the broker does not tell (Tansu)


class Admin:
    def __init__(self, bootstrap: str, options: dict[str, Any], replication_factor: int,
                 topic_wait_s: float):
        self.replication_factor = replication_factor
        self.topic_wait_s = topic_wait_s
        self.client = _Client(bootstrap_servers=bootstrap, **options)
        self._lock = threading.Lock()  # producers look policies up from their own threads

    # -- topics ---------------------------------------------------------------------------
    def partition_counts(self, names: Sequence[str]) -> dict[str, int | None]:
        """Partitions per topic from the brokers' metadata; None for a missing topic."""
        if not names:
            return {}
        out: dict[str, int | None] = dict.fromkeys(names)
        for topic in self.client.describe_topics(list(names)):
            if topic["error_code"] == 0 and topic["partitions"]:
                out[topic["name"]] = len(topic["partitions"])
        return out

    def partitions(self, topic: str) -> list[int]:
        count = self.partition_counts([topic])[topic]
        if count is None:
            raise TopicError(f"no topic {topic} on the Kafka cluster")
        return list(range(count))

    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        counts = self.partition_counts([s.name for s in specs])
        missing = [s for s in specs if counts[s.name] is None]
        if missing:
            self._create(missing)
            counts = self.partition_counts([s.name for s in specs])  # raced creators too
        for spec in specs:
            have = counts[spec.name]
            if have is None:
                raise TopicError(f"topic {spec.name} was created but has no metadata")
            if have != spec.partitions:
                raise TopicError(
                    f"topic {spec.name} has {have} partitions but its spec says "
                    f"{spec.partitions}; co-partitioned topics must match")

    def _create(self, specs: Sequence[TopicSpec]) -> None:
        new = [NewTopic(s.name, s.partitions, self.replication_factor,
                        topic_configs=topic_configs(s))
               for s in specs]
        response = self.client.create_topics(new, raise_errors=False)
        for topic in response["topics"]:
            code = topic["error_code"]
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise TopicError(f"cannot create topic {topic['name']}: "
                                 f"{for_code(code).__name__} {topic.get('error_message') or ''}")
        try:
            self.client.wait_for_topics([s.name for s in specs],
                                        timeout_ms=int(self.topic_wait_s * 1000))
        except KafkaTimeoutError as exc:
            raise TopicError(f"created topics are not ready: {exc}") from None

    def cleanup_policy(self, topic: str) -> str:
        """The topic's cleanup.policy on the brokers ("delete", "compact" or both, comma
        separated). If the brokers cannot say, the spec's, or Kafka's default "delete"."""
        try:
            with self._lock:
                described = self.client.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
            entry = described.get("topic", {}).get(topic, {}).get("cleanup.policy") or {}
            return str(entry.get("value") or "delete")
        except KafkaError as exc:
            fallback = SPECS[topic].cleanup if topic in SPECS else "delete"
            log_.warning("cannot read the cleanup.policy of %s from the brokers (%s); "
                         "assuming %r", topic, exc, fallback)
            return fallback

    # -- groups ---------------------------------------------------------------------------
    def groups(self) -> list[str]:
        return sorted({g["group_id"] for g in self.client.list_groups()})

    def committed(self, group: str) -> dict[KafkaTP, int]:
        """Committed offsets (the next offset to read) of every partition the group has."""
        found = self.client.list_group_offsets(group).get(group, {})
        return {KafkaTP(tp.topic, tp.partition): meta.offset for tp, meta in found.items()
                if meta.offset is not None and meta.offset >= 0}

    def members(self, group: str) -> list[Member]:
        described = self.client.describe_groups([group]).get(group)
        if described is None:
            return []
        if described.get("error"):
            raise KafkaError(f"describing group {group}: {described['error']}")
        out = []
        for m in described.get("members") or []:
            name = m.get("client_id") or _MEMBER_SUFFIX.sub("", m["member_id"])
            out.append(Member(name, _assigned(m.get("member_assignment"))))
        return out

    def set_committed(self, group: str, offsets: dict[KafkaTP, int]) -> None:
        result = self.client.alter_group_offsets(
            group, {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
        failed = {tp: err for tp, err in result.items() if err.__name__ != "NoError"}
        if failed:
            raise KafkaError(f"committing offsets for group {group} failed: "
                             + ", ".join(f"{tp.topic}[{tp.partition}]: {err.__name__}"
                                         for tp, err in sorted(failed.items())))

    def close(self) -> None:
        self.client.close()


def _assigned(assignment: object) -> tuple[KafkaTP, ...] | None:
    """Partitions of a decoded ConsumerProtocolAssignment; None when there is none."""
    partitions = getattr(assignment, "partitions", None)
    if not callable(partitions):
        return None
    return tuple(KafkaTP(tp.topic, tp.partition) for tp in partitions())

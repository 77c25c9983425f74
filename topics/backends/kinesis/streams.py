"""Streams and shards: one stream per topic, its shards and their lineage.

A topic's virtual partition count is recorded on its stream as the tag `streams.partitions`
(Kinesis tag keys allow letters, digits, spaces and `_ . / = + - % @`), so a process that
finds the stream with another count refuses it (TopicError) instead of routing records by a
different split of the hash space.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from topics.backends.kinesis.envelope import hash_key_of
from topics.backends.kinesis.options import KinesisOptions
from topics.backends.kinesis.positions import shard_index
from topics.log import TopicError
from topics.spec import TopicSpec

log_ = logging.getLogger(__name__)

PARTITIONS_TAG = "streams.partitions"
ACTIVE_WAIT_S = 120.0


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    index: int
    start: int  # hash key range, inclusive
    end: int
    parents: tuple[str, ...]
    first_sequence: int
    closed: bool  # has an ending sequence number: no record is added any more

    def holds(self, hash_key: int) -> bool:
        return self.start <= hash_key <= self.end


def to_shard(raw: dict[str, Any]) -> Shard:
    parents = tuple(p for p in (raw.get("ParentShardId"), raw.get("AdjacentParentShardId"))
                    if p)
    seq = raw["SequenceNumberRange"]
    return Shard(raw["ShardId"], shard_index(raw["ShardId"]),
                 int(raw["HashKeyRange"]["StartingHashKey"]),
                 int(raw["HashKeyRange"]["EndingHashKey"]), parents,
                 int(seq["StartingSequenceNumber"]), "EndingSequenceNumber" in seq)


def chain(shards: Sequence[Shard], hash_key: int) -> list[Shard]:
    """The shards that ever held `hash_key`, oldest first (each one's successor is its child,
    so shard indexes grow along it)."""
    return sorted((s for s in shards if s.holds(hash_key)), key=lambda s: s.index)


def virtual_partitions(shard: Shard, partitions: int) -> list[int]:
    """The virtual partitions whose records this shard carries."""
    return [v for v in range(partitions) if shard.holds(hash_key_of(v, partitions))]


class Streams:
    def __init__(self, client: Any, options: KinesisOptions):
        self.client = client
        self.options = options
        self._counts: dict[str, int] = {}

    def name(self, topic: str) -> str:
        return f"{self.options.prefix}{topic}"

    # -- topics ---------------------------------------------------------------------------
    def ensure(self, specs: Sequence[TopicSpec]) -> None:
        for spec in specs:
            self._ensure(spec)

    def _ensure(self, spec: TopicSpec) -> None:
        name = self.name(spec.name)
        if self._summary(name) is None:
            args: dict[str, Any] = {"StreamName": name}
            if self.options.on_demand:
                args["StreamModeDetails"] = {"StreamMode": "ON_DEMAND"}
            else:
                args["ShardCount"] = self.options.shards or spec.partitions
            with contextlib.suppress(self.client.exceptions.ResourceInUseException):
                self.client.create_stream(**args)  # (raced by another process: fine)
        self._wait_active(name)
        have = self._tags(name).get(PARTITIONS_TAG)
        if have is None:
            # A stream made here a moment ago (or by hand): record the spec's count.
            self.client.add_tags_to_stream(StreamName=name,
                                           Tags={PARTITIONS_TAG: str(spec.partitions)})
        elif int(have) != spec.partitions:
            raise TopicError(
                f"stream {name} has {have} virtual partitions (tag {PARTITIONS_TAG}) but "
                f"topic {spec.name}'s spec says {spec.partitions}; co-partitioned topics "
                "must match")
        self._counts[spec.name] = spec.partitions

    def _tags(self, name: str) -> dict[str, str]:
        """Every tag of the stream: ListTagsForStream answers a page of them at a time
        (HasMoreTags), and a team's own tags may come before ours."""
        tags: dict[str, str] = {}
        args: dict[str, Any] = {"StreamName": name}
        while True:
            page = self.client.list_tags_for_stream(**args)
            tags.update((t["Key"], t["Value"]) for t in page.get("Tags", []))
            if not page.get("HasMoreTags") or not page.get("Tags"):
                return tags
            args["ExclusiveStartTagKey"] = page["Tags"][-1]["Key"]

    def _summary(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.describe_stream_summary(  # type: ignore[no-any-return]
                StreamName=name)["StreamDescriptionSummary"]
        except self.client.exceptions.ResourceNotFoundException:
            return None

    def _wait_active(self, name: str) -> None:
        deadline = time.monotonic() + ACTIVE_WAIT_S
        delay = 0.05
        while True:
            summary = self._summary(name)
            status = summary and summary["StreamStatus"]
            if status == "ACTIVE" or status == "UPDATING":
                return
            if time.monotonic() > deadline:
                raise TopicError(f"stream {name} is not ACTIVE after {ACTIVE_WAIT_S:.0f}s "
                                 f"(status {status})")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def partition_count(self, topic: str) -> int:
        count = self._counts.get(topic)
        if count is None:
            name = self.name(topic)
            try:
                found = self._tags(name).get(PARTITIONS_TAG)
            except self.client.exceptions.ResourceNotFoundException:
                raise TopicError(f"no topic {topic}: no Kinesis stream {name}") from None
            if found is None:
                raise TopicError(f"stream {name} has no {PARTITIONS_TAG} tag: not created "
                                 "by this project (ensure_topics)")
            count = self._counts[topic] = int(found)
        return count

    # -- shards ---------------------------------------------------------------------------
    def shards(self, topic: str) -> list[Shard]:
        """Every shard of the topic's stream still listed (open and closed), by index."""
        name = self.name(topic)
        out: list[Shard] = []
        args: dict[str, Any] = {"StreamName": name}
        while True:
            try:
                page = self.client.list_shards(**args)
            except self.client.exceptions.ResourceNotFoundException:
                raise TopicError(f"no topic {topic}: no Kinesis stream {name}") from None
            out.extend(to_shard(s) for s in page["Shards"])
            token = page.get("NextToken")
            if not token:
                break
            args = {"NextToken": token}
        return sorted(out, key=lambda s: s.index)

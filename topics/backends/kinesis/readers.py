"""Reading the virtual partitions a member is assigned, each along its lineage.

Each assigned partition has a cursor reading the shards that held its hash key, oldest
first, from after its committed (or sought) position, up to and including the shard whose
lease carries it now; so a partition whose commit lies in an ancestor shard (a handover
after a split) catches up there first. A cursor parks at the end of its leased shard: the
consumer then hands the shard on (consumer.py). Cursors on the same shard from about the
same place share one GetRecords reader (a feed): a shard carries several virtual
partitions, and is read once for all of them, not once per partition.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from topics.backends.kinesis.positions import shard_index, unpack
from topics.backends.kinesis.records import ShardCursor
from topics.backends.kinesis.streams import Shard, chain
from topics.log import Message, TopicPartition

IDLE_FETCH_S = 0.2  # a reader at the tip asks again after this long


@dataclass(frozen=True)
class Bound:
    """Where a partition may read to: the shard whose lease carries it, and whether that
    lease may be processed now (all its parents at SHARD_END)."""

    stream: str
    shard_id: str
    processable: bool


@dataclass
class Feed:
    """One GetRecords reader of a shard, shared by the partitions reading it from about the
    same place (a shard carries several virtual partitions: reading it once for all of them,
    not once per partition)."""

    cursor: ShardCursor
    members: set[TopicPartition] = field(default_factory=set)
    started: bool = False
    next_fetch: float = 0.0


@dataclass
class Cursor:
    """One virtual partition's reading along its lineage."""

    tp: TopicPartition
    hash_key: int
    after: int | None
    shard: Shard | None = None  # the shard it reads (through `feed`), or has read to its end
    feed: Feed | None = None
    ended: bool = False  # `shard` was read to its end
    parked: bool = False  # at the end of the leased shard
    buffer: deque[Message] = field(default_factory=deque)
    next_try: float = 0.0


class Readers:
    def __init__(self, kinesis: Any, shards: Callable[[str], list[Shard]],
                 bound: Callable[[TopicPartition], Bound | None]):
        self.kinesis = kinesis
        self._shards = shards  # topic -> its listed shards
        self._bound = bound
        self.cursors: dict[TopicPartition, Cursor] = {}
        self._feeds: dict[tuple[str, str], list[Feed]] = {}  # (topic, shard id) -> readers
        self._rr = 0

    def add(self, tp: TopicPartition, hash_key: int, after: int | None) -> None:
        self.drop(tp)
        self.cursors[tp] = Cursor(tp, hash_key, after)

    def drop(self, tp: TopicPartition) -> None:
        cursor = self.cursors.pop(tp, None)
        if cursor is not None:
            self._leave(cursor)

    def clear(self) -> None:
        self.cursors.clear()
        self._feeds.clear()

    def parked(self, tp: TopicPartition) -> bool:
        cursor = self.cursors.get(tp)
        return cursor is None or cursor.parked

    def unpark(self, tp: TopicPartition) -> None:
        """On into the next shard (the partition's lease moved to a child)."""
        cursor = self.cursors.get(tp)
        if cursor is not None:
            cursor.parked = False

    def seek(self, tp: TopicPartition, position: int | None) -> None:
        cursor = self.cursors.get(tp)
        if cursor is None:
            return
        self._leave(cursor)
        cursor.after, cursor.shard, cursor.ended, cursor.parked = position, None, False, False
        cursor.buffer.clear()
        cursor.next_try = 0.0

    def fill(self, now: float) -> None:
        for cursor in list(self.cursors.values()):
            self._step(cursor, now)
        for feeds in list(self._feeds.values()):
            for feed in list(feeds):
                self._fetch(feed, now)

    def _leave(self, cursor: Cursor) -> None:
        feed, cursor.feed = cursor.feed, None
        if feed is not None:
            feed.members.discard(cursor.tp)
            if not feed.members:
                key = (cursor.tp.topic, feed.cursor.shard.id)
                feeds = self._feeds.get(key, [])
                if feed in feeds:
                    feeds.remove(feed)

    def _advance(self, cursor: Cursor) -> bool:
        """Moves the cursor to the next shard of its lineage it may read; False if none."""
        bound = self._bound(cursor.tp)
        if bound is None or not bound.processable:
            return False  # a child whose other parent is not finished yet waits
        limit = shard_index(bound.shard_id)
        lineage = chain(self._shards(cursor.tp.topic), cursor.hash_key)
        current = cursor.shard.index if cursor.shard is not None else None
        if current is None and cursor.after is not None:
            start = unpack(cursor.after).shard
            candidates = [s for s in lineage if s.index >= start]
        else:
            candidates = [s for s in lineage if current is None or s.index > current]
        candidates = [s for s in candidates if s.index <= limit]
        if not candidates:
            return False
        cursor.shard, cursor.ended = candidates[0], False
        self._join(cursor, bound.stream)
        return True

    def _join(self, cursor: Cursor, stream: str) -> None:
        """Reads `cursor.shard` through a feed of it that has not passed the cursor's
        position yet, or a new one."""
        assert cursor.shard is not None
        shard = cursor.shard
        start = cursor.after if cursor.after is not None and \
            unpack(cursor.after).shard == shard.index else None  # None: the shard's start
        feeds = self._feeds.setdefault((cursor.tp.topic, shard.id), [])
        for feed in feeds:
            at = feed.cursor.after
            if not feed.started:
                if start is None or (at is not None and start < at):
                    feed.cursor.after = start  # not read yet: start it lower
                break
            if at is not None and start is not None and at <= start:
                break
        else:
            feed = Feed(ShardCursor(self.kinesis, stream, cursor.tp.topic, shard, start))
            feeds.append(feed)
        feed.members.add(cursor.tp)
        cursor.feed = feed

    def _step(self, cursor: Cursor, now: float) -> None:
        """A cursor that read its shard to the end parks there or goes on."""
        if cursor.parked or cursor.feed is not None or now < cursor.next_try:
            return
        if cursor.ended and cursor.shard is not None:
            bound = self._bound(cursor.tp)
            if bound is not None and cursor.shard.id == bound.shard_id:
                cursor.parked = True
                return
        if not self._advance(cursor):
            cursor.next_try = now + IDLE_FETCH_S

    def _fetch(self, feed: Feed, now: float) -> None:
        if now < feed.next_fetch or not feed.members:
            return
        feed.started = True
        batch = feed.cursor.fetch()
        for msg in batch.messages:
            tp = TopicPartition(msg.topic, msg.partition)
            cursor = self.cursors.get(tp) if tp in feed.members else None
            if cursor is not None and (cursor.after is None or msg.position > cursor.after):
                cursor.buffer.append(msg)
                cursor.after = msg.position
        if batch.ended:
            for tp in list(feed.members):
                cursor = self.cursors.get(tp)
                if cursor is not None:
                    self._leave(cursor)
                    cursor.ended = True
        elif not batch.messages:
            feed.next_fetch = now + IDLE_FETCH_S

    def take(self, max_messages: int) -> list[Message]:
        out: list[Message] = []
        cursors = sorted(self.cursors.values(), key=lambda c: c.tp)
        for i in range(len(cursors)):
            cursor = cursors[(self._rr + i) % len(cursors)]
            while cursor.buffer and len(out) < max_messages:
                out.append(cursor.buffer.popleft())
            if len(out) >= max_messages:
                break
        self._rr += 1
        return out


"""The embedded backend: a durable single-machine log under a data directory.

    <root>/log/<topic>/topic.json       partitions, changelog, and the housekeeping config:
                                        cleanup, retention_ms, retention_bytes, segment_bytes
    <root>/log/<topic>/<n>.log, <n>.<base>.log, <n>.<base>.compacted
                                        segments of frames (segment.py, partition_file.py)
    <root>/groups/<group>/...           members, owners, committed positions (groups.py)

Housekeeping (housekeeping.py) runs when `housekeep()` is called, and on its own from the
producer (unless `auto_housekeep=False`): after a flush that rolled a segment (that
partition at once), and at most every HOUSEKEEP_EVERY_S for the partitions a producer wrote
since its last run. That costs a clock read per flush and needs no thread; an idle log is
not housekept, and nothing grows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from topics.backends.embedded.groups import GroupDir
from topics.backends.embedded.housekeeping import housekeep_partition
from topics.backends.embedded.partition_file import PartitionFile, encode_frame
from topics.log import (
    GroupBusyError,
    GroupPosition,
    Message,
    PartitionInfo,
    RebalanceListener,
    TopicError,
    TopicPartition,
    scan_first_since,
)
from topics.spec import CONFIG_KEYS, DEFAULT_SEGMENT_BYTES, TopicSpec, check_config

log_ = logging.getLogger(__name__)

log_ = logging.getLogger(__name__)

REBALANCE_EVERY_S = 0.5
HOUSEKEEP_EVERY_S = 60.0
# Frames hold any length; this bounds one message (and what a reader holds at once), and
# the importer rejects a row bigger than it as a bad row, as on Kafka.
MAX_MESSAGE_BYTES = 16 << 20
# What a topic.json without these keys (an older data dir) means: the old behaviour.
DEFAULT_CONFIG: dict[str, Any] = {"cleanup": "delete", "retention_ms": None,
                                  "retention_bytes": None,
                                  "segment_bytes": DEFAULT_SEGMENT_BYTES}


class EmbeddedLog:
    def __init__(self, root: Path, fsync: bool = False, session_timeout_s: float = 10.0,
                 auto_housekeep: bool = True):
        self.root = Path(root)
        self.session_timeout_s = session_timeout_s
        self.auto_housekeep = auto_housekeep  # producers housekeep (module docstring)
        self.url = f"embedded://{self.root}"
        self.max_message_bytes = MAX_MESSAGE_BYTES
        self.fsync = fsync
        self._files: dict[TopicPartition, PartitionFile] = {}
        self._configs: dict[str, dict[str, Any]] = {}

    # -- topics ---------------------------------------------------------------------------
    def _topic_dir(self, topic: str) -> Path:
        return self.root / "log" / topic

    def _write_meta(self, topic: str, body: dict[str, Any]) -> None:
        meta = self._topic_dir(topic) / "topic.json"
        meta.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.replace(tmp, meta)

    def _read_meta(self, topic: str) -> dict[str, Any]:
        meta = self._topic_dir(topic) / "topic.json"
        try:
            body: dict[str, Any] = json.loads(meta.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TopicError(f"no topic {topic} in {self.root}") from None
        return body

    def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Creates missing topics with their spec's config. An existing topic keeps its
        config (as on Kafka: `set_topic_config` changes it); an older topic.json without
        config keys gains the spec's."""
        for spec in specs:
            if (self._topic_dir(spec.name) / "topic.json").exists():
                body = self._read_meta(spec.name)
                have = body["partitions"]
                if have != spec.partitions:
                    raise TopicError(
                        f"topic {spec.name} has {have} partitions but its spec says "
                        f"{spec.partitions}; co-partitioned topics must match"
                    )
                missing = {k: v for k, v in spec.config().items() if k not in body}
                if missing:
                    self._write_meta(spec.name, {**body, **missing})
                    self._configs.pop(spec.name, None)
                continue
            self._write_meta(spec.name, {"partitions": spec.partitions,
                                         "changelog": spec.changelog, **spec.config()})

    def topic_config(self, topic: str, fresh: bool = False) -> dict[str, Any]:
        """The topic's housekeeping config (cached; `fresh` re-reads topic.json)."""
        config = None if fresh else self._configs.get(topic)
        if config is None:
            body = self._read_meta(topic)
            config = {k: body.get(k, DEFAULT_CONFIG[k]) for k in CONFIG_KEYS}
            self._configs[topic] = config
            for tp, pf in self._files.items():
                if tp.topic == topic:
                    pf.segment_bytes = config["segment_bytes"]
        return config

    def set_topic_config(self, topic: str, **config: Any) -> None:
        """Changes a topic's housekeeping config (cleanup, retention_ms, retention_bytes,
        segment_bytes; None clears a retention) in its topic.json. This handle applies it
        at once; another process's open handles take a new segment_bytes when they next
        housekeep, and retention applies wherever housekeeping runs next."""
        body = self._read_meta(topic)
        merged = {k: body.get(k, DEFAULT_CONFIG[k]) for k in CONFIG_KEYS}
        merged.update(config)
        try:
            check_config(topic, merged)
        except ValueError as exc:
            raise TopicError(str(exc)) from None
        self._write_meta(topic, {**body, **merged})
        self.topic_config(topic, fresh=True)

    def compacted(self, topic: str) -> bool:
        return bool(self.topic_config(topic)["cleanup"] == "compact")

    def partitions(self, topic: str) -> list[int]:
        return list(range(self._read_meta(topic)["partitions"]))

    def file(self, tp: TopicPartition) -> PartitionFile:
        pf = self._files.get(tp)
        if pf is None:
            if tp.partition not in self.partitions(tp.topic):
                raise TopicError(f"{tp}: no such partition")
            path = self._topic_dir(tp.topic) / f"{tp.partition}.log"
            pf = self._files[tp] = PartitionFile(
                path, fsync=self.fsync,
                segment_bytes=self.topic_config(tp.topic)["segment_bytes"])
        return pf

    # -- housekeeping ---------------------------------------------------------------------
    def housekeep(self, now_ms: int | None = None) -> dict[str, Any]:
        """Applies every topic's retention or compaction now (`now_ms`: the clock to judge
        ages by, for tests). Returns what it removed:
        {"deleted": [{"topic", "partition", "base", "bytes", "reason"}, ...],
         "compacted": [{"topic", "partition", "base", "removed", "kept", "bytes_before",
                        "bytes_after"}, ...],
         "freed_bytes": int}"""
        folder = self.root / "log"
        topics = sorted(p.name for p in folder.iterdir()
                        if (p / "topic.json").exists()) if folder.is_dir() else []
        return self._housekeep([TopicPartition(t, p) for t in topics
                                for p in self.partitions(t)], now_ms)

    def _housekeep(self, tps: Iterable[TopicPartition], now_ms: int | None = None
                   ) -> dict[str, Any]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        result: dict[str, Any] = {"deleted": [], "compacted": [], "freed_bytes": 0}
        fresh: set[str] = set()
        for tp in sorted(set(tps)):
            config = self.topic_config(tp.topic, fresh=tp.topic not in fresh)
            fresh.add(tp.topic)
            if config["cleanup"] != "compact" and config["retention_ms"] is None \
                    and config["retention_bytes"] is None:
                continue
            done = housekeep_partition(self.file(tp), config, now)
            for kind in ("deleted", "compacted"):
                for item in done[kind]:
                    result[kind].append({"topic": tp.topic, "partition": tp.partition, **item})
            result["freed_bytes"] += sum(d["bytes"] for d in done["deleted"]) + sum(
                c["bytes_before"] - c["bytes_after"] for c in done["compacted"])
        if result["deleted"] or result["compacted"]:
            log_.info("housekeeping deleted %d segment(s) and compacted %d, freeing %d bytes",
                      len(result["deleted"]), len(result["compacted"]), result["freed_bytes"])
        return result

    # -- clients --------------------------------------------------------------------------
    def producer(self) -> EmbeddedProducer:
        return EmbeddedProducer(self)

    def consumer(
        self, group: str, topics: Sequence[str], listener: RebalanceListener, member: str = ""
    ) -> EmbeddedConsumer:
        return EmbeddedConsumer(self, group, topics, listener, member)

    def read(self, topic: str, partition: int, after: int | None = None) -> Iterator[Message]:
        tp = TopicPartition(topic, partition)
        pf = self.file(tp)
        end = pf.size()
        pos = 0 if after is None else pf.frame_end(after)
        while pos < end:
            frames = pf.read(pos, 10_000)
            if not frames:
                return
            for position, ts, key, value, nxt in frames:
                if position >= end:
                    return
                yield Message(topic, partition, position, value, key, ts)
                pos = nxt

    def truncated(self, topic: str, partition: int) -> bool:
        segments = self.file(TopicPartition(topic, partition)).segments()
        # Positions are never reused: a first segment that does not start at 0 follows
        # deleted ones.
        return bool(segments) and segments[0].base > 0

    def read_at(self, topic: str, partition: int, position: int) -> Message:
        frames = self.file(TopicPartition(topic, partition)).read(position, 1)
        if not frames or frames[0][0] != position:
            raise TopicError(f"{topic}[{partition}]: no message at position {position}")
        _pos, ts, key, value, _next = frames[0]
        return Message(topic, partition, position, value, key, ts)

    def first_since(self, topic: str, partition: int, since_ms: int) -> int | None:
        return scan_first_since(self, topic, partition, since_ms)

    # -- inspection and admin -------------------------------------------------------------
    def _count(self, tp: TopicPartition, after: int | None) -> tuple[int, int | None, int | None]:
        first = last = None
        n = 0
        for msg in self.read(tp.topic, tp.partition, after):
            first = msg.position if first is None else first
            last = msg.position
            n += 1
        return n, first, last

    def describe(self, topic: str) -> list[PartitionInfo]:
        out = []
        for p in self.partitions(topic):
            n, first, last = self._count(TopicPartition(topic, p), None)
            out.append(PartitionInfo(topic, p, first, last, n))
        return out

    def groups(self) -> list[str]:
        folder = self.root / "groups"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def group_positions(self, group: str) -> list[GroupPosition]:
        gd = self._group(group)
        out = []
        if not gd.dir.is_dir():
            return out
        for topic_dir in sorted(p for p in gd.dir.iterdir() if p.is_dir() and p.name != "members"):
            for p in self.partitions(topic_dir.name):
                tp = TopicPartition(topic_dir.name, p)
                committed = gd.committed(tp)
                lag, _f, _l = self._count(tp, committed)
                out.append(GroupPosition(group, tp, committed, lag, gd.owner(tp)))
        return out

    def _group(self, group: str) -> GroupDir:
        return GroupDir(self.root, group, self.session_timeout_s)

    def active_members(self, group: str) -> list[str]:
        return self._group(group).live_members()

    def reset_group(self, group: str, positions: dict[TopicPartition, int | None]) -> None:
        gd = self._group(group)
        live = gd.live_members()
        if live:
            raise GroupBusyError(
                f"group {group} has running members ({', '.join(live)}); stop its workers first"
            )
        for tp, position in positions.items():
            gd.commit(tp, position)

    def close(self) -> None:
        for pf in self._files.values():
            pf.close()
        self._files.clear()


class EmbeddedProducer:
    def __init__(self, log: EmbeddedLog):
        self.log = log
        self._pending: dict[TopicPartition, list[bytes]] = {}
        self._written: set[TopicPartition] = set()
        self._next_housekeep = time.monotonic() + HOUSEKEEP_EVERY_S

    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> None:
        if key is None and self.log.compacted(topic):
            raise ValueError(
                f"Compacted topic cannot accept message without key: {topic}[{partition}] "
                "has cleanup 'compact', which keeps the last record per key")
        tp = TopicPartition(topic, partition)
        frame = encode_frame(value, key, int(time.time() * 1000))
        self._pending.setdefault(tp, []).append(frame)

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        rolled = []
        for tp, frames in pending.items():
            pf = self.log.file(tp)
            rolls = pf.rolls
            pf.append(frames)
            if pf.rolls != rolls:
                rolled.append(tp)
        if not self.log.auto_housekeep:
            return
        self._written.update(pending)
        due = time.monotonic() >= self._next_housekeep
        if rolled or due:
            if due:
                rolled, self._written = list(self._written), set()
                self._next_housekeep = time.monotonic() + HOUSEKEEP_EVERY_S
            try:
                self.log._housekeep(rolled)
            except Exception:  # what was flushed is durable; housekeeping can wait a turn
                log_.exception("housekeeping %s failed", ", ".join(map(str, rolled)))

    def close(self) -> None:
        self.flush()


class EmbeddedConsumer:
    """Owns a fair share of the subscribed partitions; shares move as members come and go.
    Ownership is a lease per partition (groups.py): a member that stops heartbeating for
    the session timeout (paused, stalled) loses its partitions to the others, and finds out
    when it wakes (`on_lost`: drop the state, write nothing)."""

    def __init__(
        self,
        log: EmbeddedLog,
        group: str,
        topics: Sequence[str],
        listener: RebalanceListener,
        member: str = "",
    ):
        self.log = log
        self.topics = list(topics)
        self.listener = listener
        self.member = member or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.groupdir = log._group(group)
        self._member_fd = self.groupdir.join(self.member)
        self._owned: dict[TopicPartition, tuple[str, int]] = {}  # tp -> lease held
        self._beating = threading.Event()
        self._heart = threading.Thread(target=self._heartbeats, daemon=True,
                                       name=f"heartbeat-{group}-{self.member}")
        self._heart.start()
        self._next: dict[TopicPartition, int] = {}  # tp -> next byte position to read
        self._next_rebalance = 0.0
        self._rr = 0

    def _heartbeats(self) -> None:
        every = max(0.05, min(1.0, self.groupdir.session_timeout_s / 4))
        while not self._beating.wait(every):
            self.groupdir.beat(self.member)

    def assignment(self) -> set[TopicPartition]:
        return set(self._owned)

    def _lost(self, tps: list[TopicPartition]) -> None:
        log_.warning("%s lost %s (its lease was taken: session expired)", self.member,
                     ", ".join(map(str, tps)))
        for tp in tps:
            self._owned.pop(tp, None)
            self._next.pop(tp, None)
        on_lost = getattr(self.listener, "on_lost", None)
        (on_lost or self.listener.on_revoked)(tps)

    def _all_partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in self.topics for p in self.log.partitions(t)]

    def _rebalance(self) -> None:
        self._next_rebalance = time.monotonic() + REBALANCE_EVERY_S
        lost = [tp for tp, lease in self._owned.items() if self.groupdir.lease(tp) != lease]
        if lost:
            self._lost(sorted(lost))
        everything = self._all_partitions()
        members = max(1, len(self.groupdir.live_members()))
        target = math.ceil(len(everything) / members)
        if len(self._owned) > target:
            extra = sorted(self._owned)[target:]
            self.listener.on_revoked(extra)
            for tp in extra:
                self.groupdir.release(tp, self._owned.pop(tp))
                self._next.pop(tp, None)
        gained = []
        for tp in everything:
            if len(self._owned) >= target:
                break
            if tp in self._owned:
                continue
            lease = self.groupdir.try_own(tp, self.member)
            if lease is not None:
                self._owned[tp] = lease
                self.seek_after(tp, self.groupdir.committed(tp))
                gained.append(tp)
        if gained:
            self.listener.on_assigned(gained)

    def seek_after(self, tp: TopicPartition, position: int | None) -> None:
        self._next[tp] = 0 if position is None else self.log.file(tp).frame_end(position)

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        while True:
            if time.monotonic() >= self._next_rebalance:
                self._rebalance()
            out = self._fetch(max_messages)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)

    def _fetch(self, max_messages: int) -> list[Message]:
        tps = sorted(self._next)
        out: list[Message] = []
        for i in range(len(tps)):
            tp = tps[(self._rr + i) % len(tps)]
            pf = self.log.file(tp)
            start = self._next[tp]
            frames = pf.read(start, max_messages - len(out))
            if not frames and pf.size() > start:
                pf.repair_if_idle()  # a tail that stays incomplete is torn
            for position, ts, key, value, nxt in frames:
                out.append(Message(tp.topic, tp.partition, position, value, key, ts))
                self._next[tp] = nxt
            if len(out) >= max_messages:
                break
        self._rr += 1
        return out

    def commit(self, positions: dict[TopicPartition, int],
               metadata: dict[TopicPartition, str] | None = None) -> None:
        lost = []
        for tp, position in positions.items():
            lease = self._owned.get(tp)
            if lease is None:  # a revoked partition's position belongs to its new owner
                continue
            if not self.groupdir.commit(tp, position, (metadata or {}).get(tp, ""), lease):
                lost.append(tp)  # fenced: another member holds it now
        if lost:
            self._lost(sorted(lost))

    def committed(self, tp: TopicPartition) -> int | None:
        return self.groupdir.committed(tp)

    def committed_metadata(self, tp: TopicPartition) -> str:
        return self.groupdir.committed_metadata(tp)

    def close(self) -> None:
        owned = sorted(self._owned)
        if owned:
            self.listener.on_revoked(owned)
        for tp, lease in self._owned.items():
            self.groupdir.release(tp, lease)
        self._owned.clear()
        self._beating.set()
        self._heart.join()
        self.groupdir.leave(self.member, self._member_fd)

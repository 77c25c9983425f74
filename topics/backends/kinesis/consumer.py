"""A group member on Kinesis: shard leases in the group's table, virtual partitions to the
runtime.

Leases. Every cycle (a third of the failover time) the member scans the table, creates the
leases the shards call for (shard_sync.py), takes free leases (no owner) and expired ones
(counter unchanged for the failover time by this process's monotonic clock) up to its fair
share of the processable ones, and when it has fewer than its share and nothing is free,
asks the member holding most for one lease (bounded stealing, one per cycle, as the KCL):
the owner hands it over cleanly in its next cycle (revoke, commit, release), and only a
request unanswered for the failover time is taken by force, as the KCL steals. A thread renews
every held lease each third of the failover time. Once a renewal is refused (the counter
moved: someone took it), or no renewal succeeded for the failover time by our clock (this
process was paused, or DynamoDB was unreachable), the lease is lost: the listener's
`on_lost` runs inside the next poll and commits for it are refused; and every commit is an
UpdateItem conditional on the counter, so a worker that lost a lease cannot commit even
before it notices. `close` revokes, checkpoints and releases (leaseOwner removed), so
another member takes the leases at once instead of after the failover time.

Virtual partitions. The runtime's partitions are the topic's virtual partitions: a member is
assigned those whose hash key lies in a processable shard it holds, and reads each along its
lineage (readers.py), parking at the end of the leased shard. When every partition of a held
shard is parked, the shard is finished: the member makes the child leases that do not exist
yet, owned by itself; partitions whose child it holds continue there without a callback;
the others are revoked (the runtime commits), their commits copied into the child lease
(not processed by anyone yet: its parents are not all at SHARD_END), and the shard is
checkpointed at SHARD_END. A child is processable once all its parents are at SHARD_END;
finished parent leases are deleted once all their children have owners.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from topics.backends.kinesis.envelope import hash_key_of
from topics.backends.kinesis.leases import (
    MEMBER_PREFIX,
    SHARD_END,
    TRIM_HORIZON,
    Commit,
    Lease,
    LeaseTable,
    with_commits,
)
from topics.backends.kinesis.positions import shard_index, unpack
from topics.backends.kinesis.readers import Bound, Readers
from topics.backends.kinesis.shard_sync import (
    commit_of,
    new_lease,
    processable,
    stream_leases,
    sync,
)
from topics.backends.kinesis.streams import Shard, Streams, virtual_partitions
from topics.log import Message, RebalanceListener, TopicPartition

log_ = logging.getLogger(__name__)



@dataclass
class _Held:
    lease: Lease
    topic: str
    renewed_at: float  # monotonic time the last successful renewal was sent
    lost: bool = False


class KinesisConsumer:
    def __init__(self, kinesis: Any, streams: Streams, table: LeaseTable, group: str,
                 topics: Sequence[str], listener: RebalanceListener, member: str,
                 failover_s: float):
        self.kinesis = kinesis
        self.streams = streams
        self.table = table
        self.group = group
        self.topics = list(topics)
        self.listener = listener
        self.member = member or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.failover_s = failover_s
        self.partitions = {t: streams.partition_count(t) for t in self.topics}
        self._by_stream = {streams.name(t): t for t in self.topics}
        self._held: dict[str, _Held] = {}
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (counter, first seen)
        self._leases: dict[str, Lease] = {}  # the last scan
        self._members: dict[str, Lease] = {}  # the member items of the last scan
        self._shards: dict[str, list[Shard]] = {}
        self._assigned: dict[TopicPartition, str] = {}  # tp -> key of the lease carrying it
        self._readers = Readers(kinesis, lambda topic: self._shards.get(topic, []), self._bound)
        self._lock = threading.RLock()  # held leases: renewals vs commits
        self._next_cycle = 0.0
        self._requested: dict[str, float] = {}  # lease key -> when we asked for it
        self._peers: dict[str, float] = {}  # member that asked us for a lease -> when
        self._handed: dict[str, float] = {}  # lease key -> when we handed it over
        self._closed = False
        self._stop = threading.Event()
        self.renewing = threading.Event()  # cleared: renewals pause (tests: a stalled worker)
        self.renewing.set()
        table.ensure()
        table.beat(self.member)
        self._renewer = threading.Thread(target=self._renewals, daemon=True,
                                         name=f"lease-renewer-{group}-{self.member}")
        self._renewer.start()

    # -- renewal --------------------------------------------------------------------------
    def _renewals(self) -> None:
        while not self._stop.wait(self.failover_s / 3):
            if not self.renewing.is_set():
                continue
            with self._lock:
                held = list(self._held.values())
            for h in held:
                self._renew(h)
            try:
                self.table.beat(self.member)
            except Exception as exc:  # others may count us out for a while: no harm
                log_.warning("member heartbeat failed: %s", exc)

    def _renew(self, h: _Held) -> None:
        with self._lock:
            if h.lost or self._held.get(h.lease.key) is not h:
                return
            sent = time.monotonic()
            try:
                renewed = self.table.renew(h.lease, self.member)
            except Exception as exc:  # network: the clock fence decides if it lasts
                log_.warning("renewing %s failed: %s", h.lease.key, exc)
                return
            if renewed is None:
                log_.warning("%s: lease %s was taken (renewal refused)", self.member,
                             h.lease.key)
                h.lost = True
            else:
                h.lease, h.renewed_at = renewed, sent

    def _valid(self, h: _Held) -> bool:
        """Held by our clock too: renewed within the failover time."""
        return not h.lost and time.monotonic() - h.renewed_at < self.failover_s

    # -- the lease cycle ------------------------------------------------------------------
    def _tps_of(self, key: str) -> list[TopicPartition]:
        return sorted(tp for tp, k in self._assigned.items() if k == key)

    def _lose(self, keys: Sequence[str]) -> None:
        tps: list[TopicPartition] = []
        for key in keys:
            self._held.pop(key, None)
            tps.extend(self._tps_of(key))
        for tp in tps:
            self._assigned.pop(tp, None)
            self._readers.drop(tp)
        if tps:
            log_.warning("%s lost %s (lease taken or expired)", self.member,
                         ", ".join(map(str, tps)))
            on_lost = getattr(self.listener, "on_lost", None)
            (on_lost or self.listener.on_revoked)(tps)

    def _check_lost(self) -> None:
        with self._lock:
            lost = [k for k, h in self._held.items() if not self._valid(h)]
        if lost:
            self._lose(lost)

    def _expired(self, lease: Lease, now: float) -> bool:
        counter, since = self._seen.get(lease.key, (lease.counter, now))
        return lease.owner is None or (counter == lease.counter
                                       and now - since >= self.failover_s)

    def _scan(self) -> None:
        now = time.monotonic()
        everything = self.table.scan(members=True)
        self._leases = {k: lease for k, lease in everything.items()
                        if not k.startswith(MEMBER_PREFIX)}
        self._members = {k: lease for k, lease in everything.items()
                         if k.startswith(MEMBER_PREFIX)}
        for key, lease in everything.items():
            seen = self._seen.get(key)
            if seen is None or seen[0] != lease.counter:
                self._seen[key] = (lease.counter, now)

    def _cycle(self) -> None:
        self._next_cycle = time.monotonic() + self.failover_s / 3
        self._check_lost()
        self._scan()
        made = False
        for topic in self.topics:
            stream = self.streams.name(topic)
            self._shards[topic] = self.streams.shards(topic)
            made = bool(sync(self.table, stream, self._shards[topic], self.partitions[topic],
                             self._leases)) or made
        if made:
            self._scan()
        self._cleanup()
        self._hand_over()
        self._take()
        self._finish_shards()
        self._reassign()

    def _ours(self, lease: Lease) -> bool:
        return lease.stream in self._by_stream

    def _processable(self) -> list[Lease]:
        out = []
        for stream in self._by_stream:
            by_shard = stream_leases(self._leases, stream)
            out.extend(lease for lease in by_shard.values() if processable(lease, by_shard))
        return out

    def _take(self) -> None:
        now = time.monotonic()
        todo = self._processable()
        live = {lease.owner for lease in self._leases.values()
                if self._ours(lease) and lease.owner and not self._expired(lease, now)}
        # Members holding no lease yet: their own items' counters move (and a member that
        # asked for a lease lately is live too).
        live |= {m.owner for m in self._members.values()
                 if m.owner and not self._expired(m, now)}
        live |= {m for m, seen in self._peers.items() if now - seen < self.failover_s}
        live.add(self.member)
        target = math.ceil(len(todo) / len(live)) if todo else 0
        mine = [lease for lease in todo if lease.key in self._held]
        # (not one we just handed over: it is for the member that asked)
        free = sorted((lease for lease in todo
                       if lease.key not in self._held and self._expired(lease, now)
                       and now - self._handed.get(lease.key, -math.inf) >= self.failover_s),
                      key=lambda lease: (lease.owner is not None, lease.key))
        wanted = max(0, target - len(mine))
        for lease in free[:wanted]:
            self._take_one(lease)
        if wanted > len(free):
            counts: dict[str, list[Lease]] = {}
            for lease in todo:
                if lease.owner and lease.owner != self.member and lease not in free:
                    counts.setdefault(lease.owner, []).append(lease)
            richest = max(counts.values(), key=len, default=[])
            if len(richest) > target:
                self._steal(sorted(richest, key=lambda lease: lease.key)[-1], now)

    def _steal(self, victim: Lease, now: float) -> None:
        """Asks for the lease first (its owner hands it over cleanly in its next cycle);
        takes it when the request stays unanswered for the failover time."""
        asked = self._requested.get(victim.key)
        if victim.requested_by != self.member or asked is None:
            if self.table.request(victim, self.member):
                self._requested[victim.key] = now
                log_.info("%s asks %s for %s", self.member, victim.owner, victim.key)
        elif now - asked >= self.failover_s:
            log_.info("%s steals %s from %s (no answer for %.1fs)", self.member, victim.key,
                      victim.owner, now - asked)
            self._take_one(victim)

    def _hand_over(self) -> None:
        """Held leases another member asked for: revoke (the runtime commits), release."""
        for key, h in list(self._held.items()):
            scanned = self._leases.get(key)
            if scanned is None or not scanned.requested_by or h.lease.finished:
                continue
            if scanned.requested_by == self.member or not self._valid(h):
                continue
            tps = self._tps_of(key)
            self._peers[scanned.requested_by] = self._handed[key] = time.monotonic()
            log_.info("%s hands %s over to %s", self.member, key, scanned.requested_by)
            if tps:
                self.listener.on_revoked(tps)
            for tp in tps:
                self._assigned.pop(tp, None)
                self._readers.drop(tp)
            with self._lock:
                self._held.pop(key, None)
                released = self.table.release(h.lease, self.member)
            if released is not None:
                self._leases[key] = released

    def _take_one(self, lease: Lease) -> None:
        taken = self.table.take(lease, self.member)
        if taken is None:
            return  # someone else was quicker
        topic = self._by_stream[taken.stream]
        with self._lock:
            self._held[taken.key] = _Held(taken, topic, time.monotonic())
        self._leases[taken.key] = taken
        log_.info("%s took lease %s", self.member, taken.key)

    def _cleanup(self) -> None:
        """Deletes finished leases whose children all exist and have owners."""
        for stream, topic in self._by_stream.items():
            by_shard = stream_leases(self._leases, stream)
            for shard in self._shards.get(topic, []):
                lease = by_shard.get(shard.id)
                if lease is None or not lease.finished or lease.key in self._held:
                    continue
                children = [s for s in self._shards[topic] if shard.id in s.parents]
                done = children and all(c.id in by_shard and by_shard[c.id].owner
                                        for c in children)
                if done and self.table.delete(lease):
                    self._leases.pop(lease.key, None)

    # -- assignment -----------------------------------------------------------------------
    def _reassign(self) -> None:
        with self._lock:
            held = {k: h for k, h in self._held.items() if self._valid(h)}
        by_stream = {s: stream_leases(self._leases, s) for s in self._by_stream}
        wanted: dict[TopicPartition, str] = {}
        for key, h in held.items():
            lease = h.lease
            if lease.finished or not processable(lease, by_stream[lease.stream]):
                continue
            shard = self._shard(h.topic, lease.shard_id)
            if shard is None:
                continue
            for v in virtual_partitions(shard, self.partitions[h.topic]):
                wanted[TopicPartition(h.topic, v)] = key
        # Partitions parked at the end of a shard we still hold stay ours until it finishes.
        for tp, key in self._assigned.items():
            if tp not in wanted and key in held:
                wanted[tp] = key
        gone = sorted(tp for tp in self._assigned if tp not in wanted)
        if gone:
            log_.info("%s revokes %s (their leases are gone)", self.member,
                      ", ".join(map(str, gone)))
            self.listener.on_revoked(gone)
            for tp in gone:
                self._assigned.pop(tp, None)
                self._readers.drop(tp)
        new = sorted(tp for tp in wanted if tp not in self._assigned)
        for tp, key in wanted.items():
            moved = self._assigned.get(tp)
            self._assigned[tp] = key
            if moved is not None and moved != key:
                self._readers.unpark(tp)  # on into the child
        for tp in new:
            commit = self._commit_of(tp)
            self._readers.add(tp, hash_key_of(tp.partition, self.partitions[tp.topic]),
                              None if commit is None else commit.position)
        if new:
            log_.info("%s assigned %s", self.member, ", ".join(map(str, new)))
            self.listener.on_assigned(new)

    def _shard(self, topic: str, shard_id: str) -> Shard | None:
        for shard in self._shards.get(topic, []):
            if shard.id == shard_id:
                return shard
        return None

    def _finish_shards(self) -> None:
        """Held shards whose partitions are all parked at their end: hand them on."""
        for key, h in list(self._held.items()):
            tps = self._tps_of(key)
            if h.lease.finished or not self._valid(h):
                continue
            if not tps:
                # A shard carrying no virtual partition (a split left no partition's hash
                # key in it) holds no message of ours: finished once it is closed, or a
                # merged child of it would wait for it for ever.
                shard = self._shard(h.topic, h.lease.shard_id)
                if shard is None or not shard.closed or not processable(
                        h.lease, stream_leases(self._leases, h.lease.stream)):
                    continue
            elif not all(self._readers.parked(tp) for tp in tps):
                continue
            self._finish(h, tps)

    def _finish(self, h: _Held, tps: list[TopicPartition]) -> None:
        topic, stream = h.topic, h.lease.stream
        shards = self._shards[topic] = self.streams.shards(topic)
        by_shard = stream_leases(self._leases, stream)
        by_shard[h.lease.shard_id] = h.lease
        children: dict[str, Lease] = {}
        for child in (s for s in shards if h.lease.shard_id in s.parents):
            lease = by_shard.get(child.id)
            if lease is None:
                lease = new_lease(stream, child, self.partitions[topic], by_shard, self.member)
                if self.table.create(lease):
                    with self._lock:
                        self._held[lease.key] = _Held(lease, topic, time.monotonic())
                else:
                    lease = self.table.get(lease.key) or lease
            self._leases[lease.key] = children[child.id] = lease
        continuing, handed = [], []
        for tp in tps:
            hk = hash_key_of(tp.partition, self.partitions[topic])
            child = next((c for c in children.values() if c.start <= hk <= c.end), None)
            if child is not None and child.key in self._held:
                continuing.append((tp, child.key))
            else:
                handed.append((tp, child))
        if handed:
            log_.info("%s: %s finished; %s go on elsewhere", self.member, h.lease.key,
                      ", ".join(str(tp) for tp, _ in handed))
            self.listener.on_revoked([tp for tp, _ in handed])  # the runtime commits here
            into: dict[str, dict[int, Commit]] = {}
            for tp, child in handed:
                self._assigned.pop(tp, None)
                self._readers.drop(tp)
                commit = h.lease.commits.get(tp.partition)
                if child is not None and commit is not None:
                    into.setdefault(child.key, {})[tp.partition] = commit
            with self._lock:
                for child_key, commits in into.items():
                    if not self.table.hand_over(h.lease, self.member, child_key, commits):
                        h.lost = True  # the parent was taken: its new owner hands over
                        break
            if h.lost:
                self._lose([h.lease.key])
                return
        with self._lock:
            done = self.table.checkpoint(h.lease, self.member, SHARD_END, 0, {})
            if done is None:
                h.lost = True
            else:  # finished: its partitions go on; nothing is committed to it any more
                self._held.pop(done.key, None)
        if done is None:
            self._lose([h.lease.key])
            return
        self._leases[done.key] = done
        log_.info("%s: %s checkpointed at SHARD_END", self.member, done.key)
        for tp, child_key in continuing:
            self._assigned[tp] = child_key
            self._readers.unpark(tp)
        released = self.table.release(done, self.member)
        if released is not None:
            self._leases[done.key] = released

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() >= self._next_cycle:
                self._cycle()
            else:
                self._check_lost()
            out = self._readers.take(max_messages)
            if out:
                return out
            self._readers.fill(time.monotonic())
            out = self._readers.take(max_messages)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def _bound(self, tp: TopicPartition) -> Bound | None:
        h = self._held.get(self._assigned.get(tp, ""))
        if h is None:
            return None
        return Bound(h.lease.stream, h.lease.shard_id,
                     processable(h.lease, stream_leases(self._leases, h.lease.stream)))

    # -- Consumer -------------------------------------------------------------------------
    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def seek_after(self, tp: TopicPartition, position: int | None) -> None:
        self._readers.seek(tp, position)

    def commit(self, positions: dict[TopicPartition, int],
               metadata: dict[TopicPartition, str] | None = None) -> None:
        notes = metadata or {}
        per_lease: dict[str, dict[int, Commit]] = {}
        for tp, position in positions.items():
            key = self._assigned.get(tp)
            if key is None:
                continue  # a revoked partition's position belongs to its new owner
            per_lease.setdefault(key, {})[tp.partition] = Commit(position, notes.get(tp, ""))
        lost = []
        for key, commits in per_lease.items():
            with self._lock:
                h = self._held.get(key)
                if h is None or not self._valid(h):
                    lost.append(key)
                    continue
                checkpoint, sub = self._shard_checkpoint(h, commits)
                sent = time.monotonic()
                done = self.table.checkpoint(h.lease, self.member, checkpoint, sub, commits)
                if done is None:
                    h.lost = True
                    lost.append(key)
                else:  # a conditional write that went through renews the lease too
                    h.lease, h.renewed_at = done, sent
                    self._leases[key] = done
        if lost:
            self._lose(lost)

    def _shard_checkpoint(self, h: _Held, commits: dict[int, Commit]) -> tuple[str, int]:
        """The lowest position any of the shard's partitions still needs, in the shard."""
        if h.lease.finished:
            return SHARD_END, 0
        index = shard_index(h.lease.shard_id)
        merged = with_commits(h.lease, commits).commits
        shard = self._shard(h.topic, h.lease.shard_id)
        vs = virtual_partitions(shard, self.partitions[h.topic]) if shard else list(merged)
        lowest = None
        for v in vs:
            commit = merged.get(v)
            if commit is None or commit.position is None:
                return TRIM_HORIZON, 0
            at = unpack(commit.position)
            if at.shard < index:
                return TRIM_HORIZON, 0
            lowest = at if lowest is None or at < lowest else lowest
        if lowest is None:
            return TRIM_HORIZON, 0
        return str(lowest.sequence), lowest.sub

    def _commit_of(self, tp: TopicPartition) -> Commit | None:
        key = self._assigned.get(tp)
        h = self._held.get(key or "")
        if h is not None:  # ours: the lease carrying it is where it is committed
            return h.lease.commits.get(tp.partition)
        leases = self.table.scan()
        return commit_of(stream_leases(leases, self.streams.name(tp.topic)), tp.partition,
                         self.partitions[tp.topic])

    def committed(self, tp: TopicPartition) -> int | None:
        commit = self._commit_of(tp)
        return None if commit is None else commit.position

    def committed_metadata(self, tp: TopicPartition) -> str:
        commit = self._commit_of(tp)
        return "" if commit is None else commit.metadata

    def close(self) -> None:
        """Revokes what it owns (the runtime checkpoints), then releases every lease."""
        if self._closed:
            return
        self._closed = True
        try:
            owned = sorted(self._assigned)
            if owned:
                self.listener.on_revoked(owned)
        finally:
            self._stop.set()
            self._renewer.join(timeout=10)
            with self._lock:
                held, self._held = list(self._held.values()), {}
            for h in held:
                if not h.lost:
                    try:
                        self.table.release(h.lease, self.member)
                    except Exception as exc:  # it expires after the failover time instead
                        log_.warning("releasing %s failed: %s", h.lease.key, exc)
            try:
                self.table.leave(self.member)
            except Exception as exc:  # its item stops moving: counted out after failover
                log_.warning("leaving %s failed: %s", self.table.name, exc)
            self._assigned.clear()
            self._readers.clear()


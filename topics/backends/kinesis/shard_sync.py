"""Which leases a group's table should hold for a stream's shards, and whose commit counts
(the KCL's ShardSyncer, for TRIM_HORIZON starts).

A shard gets a lease when it has none, no descendant of it has one (a parent's lease is
deleted once its children run: it must not come back), and each of its parents still listed
is checkpointed at SHARD_END. So a fresh table gets leases for the oldest shards, and
children appear once their parents are finished; a child's lease starts with the commits
of its parents for the virtual partitions it carries.

A lease is processable when none of its parents has a lease that is not at SHARD_END.

A virtual partition's commit is in the newest lease (highest shard index) of its stream that
holds its hash key: children copy their parents' commits when they are made, and commits go
to the lease that carries the partition now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from topics.backends.kinesis.envelope import hash_key_of
from topics.backends.kinesis.leases import Commit, Lease, LeaseTable, lease_key
from topics.backends.kinesis.positions import shard_index
from topics.backends.kinesis.streams import Shard, virtual_partitions


def stream_leases(leases: Mapping[str, Lease], stream: str) -> dict[str, Lease]:
    """The stream's leases by shard id."""
    return {lease.shard_id: lease for lease in leases.values() if lease.stream == stream}


def processable(lease: Lease, by_shard: Mapping[str, Lease]) -> bool:
    return not lease.finished and all(p not in by_shard or by_shard[p].finished
                                      for p in lease.parents)


def newest(by_shard: Mapping[str, Lease], hash_key: int) -> Lease | None:
    holding = [lease for lease in by_shard.values() if lease.start <= hash_key <= lease.end]
    return max(holding, key=lambda lease: shard_index(lease.shard_id), default=None)


def commit_of(by_shard: Mapping[str, Lease], partition: int, partitions: int) -> Commit | None:
    lease = newest(by_shard, hash_key_of(partition, partitions))
    return None if lease is None else lease.commits.get(partition)


def _descendants(shards: Sequence[Shard]) -> dict[str, set[str]]:
    children: dict[str, set[str]] = {}
    for shard in shards:
        for parent in shard.parents:
            children.setdefault(parent, set()).add(shard.id)
    out: dict[str, set[str]] = {}

    def walk(shard_id: str) -> set[str]:
        if shard_id not in out:
            found: set[str] = set()
            for child in children.get(shard_id, ()):
                found |= {child, *walk(child)}
            out[shard_id] = found
        return out[shard_id]

    for shard in shards:
        walk(shard.id)
    return out


def new_lease(stream: str, shard: Shard, partitions: int, by_shard: Mapping[str, Lease],
              owner: str | None = None) -> Lease:
    """A lease for `shard` carrying its parents' commits of its virtual partitions."""
    carried: dict[int, Commit] = {}
    for parent in shard.parents:
        lease = by_shard.get(parent)
        if lease is not None:
            carried.update(lease.commits)
    mine = set(virtual_partitions(shard, partitions))
    return Lease(key=lease_key(stream, shard.id), stream=stream, shard_id=shard.id,
                 owner=owner, counter=1 if owner else 0, parents=shard.parents,
                 start=shard.start, end=shard.end,
                 commits={v: c for v, c in carried.items() if v in mine})


def sync(table: LeaseTable, stream: str, shards: Sequence[Shard], partitions: int,
         leases: Mapping[str, Lease]) -> list[Lease]:
    """Creates the leases the rules above call for; returns those this call made."""
    by_shard = stream_leases(leases, stream)
    listed = {s.id for s in shards}
    below = _descendants(shards)
    made = []
    for shard in shards:  # oldest first
        if shard.id in by_shard or below[shard.id] & set(by_shard):
            continue
        parents = [p for p in shard.parents if p in listed]
        if not all(p in by_shard and by_shard[p].finished for p in parents):
            continue
        lease = new_lease(stream, shard, partitions, by_shard)
        if table.create(lease):
            made.append(lease)
        by_shard[shard.id] = lease
    return made

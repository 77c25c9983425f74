"""S3 sink: membership changes as objects under deterministic keys, and manifests.

    <prefix>/batch=<id>/partition=<p>/part-<position key>-<part 5 digits>.<ext>
    <prefix>/batch=<id>/partition=<p>/_manifest.json   that partition's objects (on its close)
    <prefix>/batch=<id>/manifest.json                  COPY manifest, once all partitions closed

A chunk's key is the stamp of its first change: the source position of the input message
that made it and the part of that input's outputs (a replace end marker's removals come in
parts that share its position), so no two chunks share a key. The position key is
topics/positions.key: 20 digits below 10**20 (the names of every object written before wide
positions), `w...` above, so that names sort in log order at any width. Each row carries its own
source_position and part: folding the rows of every object a `_manifest.json` lists by
(partition, source_position, part, row) replays the membership changes in log order,
across batches (connectors/s3_fold.py).
Same chunk, same key, same bytes: a rewrite after a crash or a replay is a no-op in effect.
The store is an ObjectStore: a local directory by default, or S3 (`--s3-root s3://...`).
The batch manifest is created once (a conditional put): of two writers, one wins.
"""

from __future__ import annotations

import json

from connectors.change_set import ChangeSet
from connectors.object_formats import ManifestEntry, encode_changes, encode_manifest, extension
from connectors.object_store import ObjectStore
from topics import positions


def object_name(first_position: int, first_part: int, fmt: str) -> str:
    """part-<position key>-<part 5 digits>.<ext>: sorted by name is in log order."""
    return f"part-{positions.key(first_position)}-{first_part:05d}{extension(fmt)}"


def parse_object_name(name: str) -> tuple[int, int]:
    """(first position, first part) of a chunk's object name, either key form."""
    stem = name.rpartition("/")[2].split(".", 1)[0]
    kind, position, part = stem.split("-") if stem.count("-") == 2 else ("", "", "")
    if kind != "part" or not part.isdigit():
        raise ValueError(f"{name!r} is not a chunk's object name (part-<position>-<part>)")
    return positions.from_key(position), int(part)


class S3Sink:
    name = "s3"

    def __init__(self, store: ObjectStore, fmt: str = "parquet",
                 prefix: str = "audience/segment-changes"):
        self.store = store
        self.fmt = fmt
        self.prefix = prefix
        # Per open (batch, partition), its objects by URL: a chunk written again (a batch
        # re-read after a crash or a rebalance) replaces its entry, as it replaces its object.
        self._written: dict[tuple[str, int], dict[str, ManifestEntry]] = {}

    def batch_prefix(self, batch_id: str) -> str:
        return f"{self.prefix}/batch={batch_id}"

    def _partition_prefix(self, batch_id: str, partition: int) -> str:
        return f"{self.batch_prefix(batch_id)}/partition={partition}"

    def write_chunk(self, changes: ChangeSet) -> None:
        key = (f"{self._partition_prefix(changes.batch_id, changes.partition)}/"
               f"{object_name(changes.first_position, changes.first_part, self.fmt)}")
        data = encode_changes(changes, self.fmt)
        self.store.put(key, data)
        url = self.store.url(key)
        entries = self._written.setdefault((changes.batch_id, changes.partition), {})
        entries[url] = ManifestEntry(url, len(data), len(changes))

    def reset_partition(self, partition: int) -> None:
        # The partition's open batches are re-read whole: their objects are listed again.
        for key in [k for k in self._written if k[1] == partition]:
            del self._written[key]

    def close_partition(self, batch_id: str, partition: int, partitions: int,
                        end_position: int) -> str:
        # Objects need nothing more at `end_position`: their rows carry their stamps.
        entries = self._written.pop((batch_id, partition), {})
        self.store.put(f"{self._partition_prefix(batch_id, partition)}/_manifest.json",
                       encode_manifest(entries.values(), batch_id=batch_id, fmt=self.fmt))
        self._write_batch_manifest(batch_id, partitions)
        return self.store.url(f"{self.batch_prefix(batch_id)}/manifest.json")

    def _write_batch_manifest(self, batch_id: str, partitions: int) -> None:
        """Once every partition has closed (whichever worker closes the last one)."""
        parts = [f"{self._partition_prefix(batch_id, p)}/_manifest.json"
                 for p in range(partitions)]
        if not all(self.store.exists(key) for key in parts):
            return
        entries = []
        for key in parts:
            for e in json.loads(self.store.get(key))["entries"]:
                meta = e["meta"]
                entries.append(ManifestEntry(e["url"], meta["content_length"],
                                             meta["record_count"]))
        put_once(self.store, f"{self.batch_prefix(batch_id)}/manifest.json",
                 encode_manifest(entries, batch_id=batch_id, fmt=self.fmt))


class ManifestConflict(RuntimeError):
    """Two writers wrote different batch manifests at once: neither may silently win."""


def put_once(store: ObjectStore, key: str, data: bytes) -> None:
    """Writes the object with conditional puts, so that of two writers only one can win.
    Created with If-None-Match: *; already there with the same bytes is done (a rewrite
    after a crash, or the other worker that closed a last partition at the same time).
    Other bytes there were made from partition manifests that have changed since (a replay
    rewrote them; this writer just read the new ones): replaced conditionally on the object
    read (If-Match). Losing that race to a writer of other bytes is an error."""
    if store.put_if_absent(key, data):
        return
    try:
        existing = store.get(key)
    except KeyError:  # deleted in between: once more, conditionally again
        if store.put_if_absent(key, data):
            return
        existing = store.get(key)
    if existing == data or store.replace_if_same(key, existing, data):
        return
    now = store.get(key)
    if now != data:
        raise ManifestConflict(f"{store.url(key)} was written meanwhile with other content "
                               f"({len(now):,} bytes, this writer's {len(data):,}): two "
                               "writers disagree about the batch; not overwritten")

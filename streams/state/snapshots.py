"""State snapshots in an object store, so that a restore never needs history the log may
have dropped (Kafka `cleanup.policy=delete`, Kinesis retention) and stays bounded in time.

A snapshot of a partition is every key of every table as of one changelog position (the
last message it covers), with the input stamp, the owner generation and the replay epoch
then in force. Restore = newest valid snapshot + the changelog after it.

    <prefix>/<changelog topic>/<partition>/snapshot-<covers key>-<generation>.snap

(the key of topics/positions.py: 20 digits below 10**20, as every snapshot written before
wide positions is named, `w...` above; the header's numbers are JSON, of any width).

An object is whole or absent: the store's put is atomic, and a snapshot ends with the
SHA-256 of what precedes it (a damaged one is skipped, loudly). Only an owner writes one,
and only after reading every changelog message from its own claim to the position the
snapshot covers and finding no newer owner's claim there (a zombie never snapshots what a
newer owner voided). A replay fence after a snapshot that rewinds to an input it covers
voids it (its state includes what is being recomputed): restore then takes an older one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from topics import positions
from topics.columns import pack_text, unpack_text

log_ = logging.getLogger(__name__)

MAGIC = b"STREAMS-SNAPSHOT-1\n"
KEEP = 3  # snapshots kept per partition (older ones are deleted once a newer one is whole)


class BlobStore(Protocol):
    """What snapshots need of an object store (connectors' ObjectStore satisfies it)."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def list(self, prefix: str) -> list[str]: ...


@dataclass(frozen=True)
class Snapshot:
    covers: int  # the changelog position of the last message it reflects
    generation: int
    epoch: int
    floor: int  # the highest claim generation as of `covers`
    applied: int | None  # the input stamp
    tables: dict[str, list[tuple[str, str]]]  # table -> [(key, encoded value)]


class SnapshotStore:
    def __init__(self, store: BlobStore, prefix: str = "_state"):
        self.store = store
        self.prefix = prefix.strip("/")

    def _dir(self, topic: str, partition: int) -> str:
        return f"{self.prefix}/{topic}/{partition}"

    # -- snapshots ------------------------------------------------------------------------
    def save(self, topic: str, partition: int, snapshot: Snapshot) -> str:
        # Per table (by name): its keys, then its values, each packed (joined by newlines);
        # the header gives every section's length in bytes.
        sections = []
        for name in sorted(snapshot.tables):
            entries = snapshot.tables[name]
            sections.append(pack_text([k for k, _v in entries]).encode())
            sections.append(pack_text([v for _k, v in entries]).encode())
        header = {"covers": snapshot.covers, "generation": snapshot.generation,
                  "epoch": snapshot.epoch, "floor": snapshot.floor,
                  "applied": snapshot.applied,
                  "tables": {name: len(entries) for name, entries in snapshot.tables.items()},
                  "sections": [len(section) for section in sections]}
        body = b"".join([MAGIC, json.dumps(header).encode(), b"\n", *sections])
        key = (f"{self._dir(topic, partition)}/snapshot-{positions.key(snapshot.covers)}-"
               f"{snapshot.generation}.snap")
        self.store.put(key, body + hashlib.sha256(body).digest())
        self._prune(topic, partition)
        return key

    def _keys(self, topic: str, partition: int) -> list[str]:
        """Snapshot keys, newest (highest covered position) first."""
        keys = [k for k in self.store.list(f"{self._dir(topic, partition)}/snapshot-")
                if k.endswith(".snap")]
        return sorted(keys, key=_covers, reverse=True)

    def _prune(self, topic: str, partition: int) -> None:
        delete = getattr(self.store, "delete", None)
        if delete is not None:
            for key in self._keys(topic, partition)[KEEP:]:
                delete(key)

    def candidates(self, topic: str, partition: int) -> Iterator[Snapshot]:
        """Readable snapshots, newest first (fences are checked by the caller, which reads
        the changelog after them)."""
        for key in self._keys(topic, partition):
            snapshot = self._load(key)
            if snapshot is not None:
                yield snapshot

    def _load(self, key: str) -> Snapshot | None:
        try:
            data = self.store.get(key)
        except KeyError:
            return None  # pruned meanwhile
        body, digest = data[:-32], data[-32:]
        if not body.startswith(MAGIC) or hashlib.sha256(body).digest() != digest:
            log_.error("snapshot %s is damaged (bad magic or checksum); skipped", key)
            return None
        end = body.index(b"\n", len(MAGIC))
        header = json.loads(body[len(MAGIC):end])
        offset = end + 1
        sections = []
        for length in header["sections"]:
            sections.append(body[offset : offset + length].decode())
            offset += length
        tables: dict[str, list[tuple[str, str]]] = {}
        for i, name in enumerate(sorted(header["tables"])):
            count = header["tables"][name]
            keys = unpack_text(sections[2 * i], count)
            values = unpack_text(sections[2 * i + 1], count)
            tables[name] = list(zip(keys, values, strict=True))
        return Snapshot(header["covers"], header["generation"], header["epoch"],
                        header["floor"], header["applied"], tables)


def _covers(key: str) -> int:
    """The changelog position a snapshot's name says it covers (either key form)."""
    return positions.from_key(key.rsplit("/", 1)[1].split("-")[1])

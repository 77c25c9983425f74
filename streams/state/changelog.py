"""Changelog messages: a table partition's changes, stamped with the input position they
cover. Written after the outputs they produced are durable, read back by recovery.

Changelog topics are `cleanup.policy=delete`: restore starts from the newest snapshot in
the object store and reads the changelog after it, so it never needs history the log may
drop (Kafka retention, Kinesis' 1-365 days). Three kinds of message, and the rules that
make a restore see only what is valid:
- `Changelog`: one checkpoint of a partition is `parts` messages under one (generation,
  input position). A checkpoint is applied only when all its parts were read: a crash in
  the middle of writing one leaves a torn checkpoint that restore discards (its inputs
  are then reprocessed, since the stamp before it still stands).
- `ChangelogClaim`: a new owner writes one before it restores. Entries of a lower
  generation after a claim are void: they come from a zombie (an owner whose session
  expired or that was paused) that kept flushing after it lost the partition.
- `ChangelogFence`: a replay rewinds a table by appending a fence rather than cutting the
  log (Kafka cannot cut a partition's tail): entries before a fence stamped at or after its
  `from_position` are void, and outputs made after it carry the fence's epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streams.faults import crash_armed, crash_point
from topics.codec import decode, encode, schema_name
from topics.columns import pack_text, unpack_text
from topics.log import Log, Producer

MAX_ENTRIES = 20_000  # per message
# Per message, well under Kafka's default 1 MiB request limit whatever the keys and values.
MAX_BYTES = 512 * 1024
ENTRY, FENCE, CLAIM = "Changelog", "ChangelogFence", "ChangelogClaim"

Changes = dict[str, list[tuple[str, str | None]]]  # table -> [(key, encoded value or None)]
UNCHAINED = -2  # a checkpoint that does not name the one before it


def write_checkpoint(producer: Producer, topic: str, partition: int, applied: int,
                     generation: int, changes: Changes, crash_name: str = "",
                     previous: int | None = UNCHAINED) -> int:
    """Sends one checkpoint of a partition as parts 0..n-1 (the caller flushes); returns
    the bytes sent. `previous`: the stamp of the checkpoint before it (None: the first;
    UNCHAINED: not said, so not checked, as from writers before the chain)."""
    bodies = [body for table, entries in changes.items()
              for start in range(0, len(entries), MAX_ENTRIES)
              for body in _bodies(table, applied, entries[start : start + MAX_ENTRIES])]
    inside = f"{crash_name}.inside_changelog"
    sent = 0
    for part, body in enumerate(bodies):
        value = encode(ENTRY, {**body, "generation": generation, "part": part,
                               "parts": len(bodies),
                               "previous": -1 if previous is None else previous})
        producer.send(topic, partition, value, _key(f"entry:{generation}:{applied}:{part}"))
        sent += len(value)
        if part == 0 and len(bodies) > 1 and crash_armed(inside):
            producer.flush()  # part 0 durable, the rest not: a torn checkpoint
            crash_point(inside)
    return sent


def _body(table: str, applied: int, part: list[tuple[str, str | None]]) -> dict[str, Any]:
    kept = [(k, v) for k, v in part if v is not None]
    deleted = [k for k, v in part if v is None]
    return {"table": table, "input_position": applied, "count": len(kept),
            "key_column": pack_text([k for k, _v in kept]),
            "value_column": pack_text([v for _k, v in kept]),  # type: ignore[misc]
            "deleted_count": len(deleted), "deleted_column": pack_text(deleted)}


def _bodies(table: str, applied: int, part: list[tuple[str, str | None]]
            ) -> list[dict[str, Any]]:
    """The entries as one message body, or as halves (recursively) while that is over
    MAX_BYTES. The size is that of its text columns in UTF-8 (all but a few dozen bytes of
    the encoded message, far inside the margin to the broker's limit): each message is
    Avro-encoded once, when sent."""
    body = _body(table, applied, part)
    size = sum(len(body[c].encode()) for c in ("key_column", "value_column", "deleted_column"))
    if len(part) == 1 or size <= MAX_BYTES:
        return [body]
    half = len(part) // 2
    return _bodies(table, applied, part[:half]) + _bodies(table, applied, part[half:])


def write_claim(producer: Producer, topic: str, partition: int, generation: int,
                member: str) -> None:
    producer.send(topic, partition, encode(CLAIM, {"generation": generation, "member": member}),
                  _key(f"claim:{generation}:{member}"))


def write_fence(producer: Producer, topic: str, partition: int, from_position: int,
                epoch: int = 0) -> None:
    producer.send(topic, partition, encode(FENCE, {"from_position": from_position,
                                                   "epoch": epoch}),
                  _key(f"fence:{epoch}:{from_position}"))


def _key(text: str) -> bytes:
    """Every changelog message has a key of its own: a real Kafka broker refuses keyless
    records on a compacted topic, and with no two messages sharing a key, compaction (if an
    operator turns it on) can drop nothing a restore needs. Restores never rely on it: they
    start from a snapshot (snapshots.py)."""
    return text.encode()


@dataclass
class Checkpoint:
    """One whole checkpoint as read back: its changes, table by table."""

    generation: int
    applied: int
    previous: int  # the stamp of the checkpoint before it (-1: none; -2: not recorded)
    tables: list[tuple[str, list[str], list[str | None]]] = field(default_factory=list)


@dataclass
class Tail:
    """What a read of the changelog learned besides the checkpoints."""

    floor: int = 0  # the highest claim generation seen: lower entries after it are void
    generation: int = 0  # the highest generation seen at all
    epoch: int = 0  # the highest replay epoch seen
    last_position: int | None = None  # of the last message read
    first_schema: str = ""  # of the first message read (is the history whole?)
    first_generation: int = 0  # of that message, if a claim or an entry
    fences: list[tuple[int, int, int]] = field(default_factory=list)  # (position, from, epoch)
    claims: list[tuple[int, int, str]] = field(default_factory=list)  # (position, gen, member)
    torn: int = 0  # incomplete checkpoints discarded


def read_checkpoints(log: Log, topic: str, partition: int, after: int | None, tail: Tail
                     ) -> Iterator[Checkpoint]:
    """Whole, valid checkpoints after `after`, oldest first; `tail` (which carries the floor
    and epoch of what came before `after`) is updated as the read goes. Two passes: the
    first finds fences from message headers alone."""
    fences = []
    for msg in log.read(topic, partition, after):
        if schema_name(msg.value) == FENCE:
            value = decode(msg.value)[1]
            fences.append((msg.position, value["from_position"], value["epoch"]))
    # void_from[i]: the lowest from_position of fences i.. (an entry is void if its stamp is
    # at or above that of any fence after it).
    void_from = [f for _p, f, _e in fences]
    for i in range(len(void_from) - 2, -1, -1):
        void_from[i] = min(void_from[i], void_from[i + 1])
    tail.fences.extend(fences)
    next_fence = 0
    pending: Checkpoint | None = None
    expected = 0  # the part `pending` waits for
    for msg in log.read(topic, partition, after):
        tail.last_position = msg.position
        while next_fence < len(fences) and fences[next_fence][0] <= msg.position:
            tail.epoch = max(tail.epoch, fences[next_fence][2])
            next_fence += 1
        name = schema_name(msg.value)
        first = not tail.first_schema
        if first:
            tail.first_schema = name
        if name != ENTRY:
            if name == CLAIM:
                claim = decode(msg.value)[1]
                if first:
                    tail.first_generation = claim["generation"]
                tail.claims.append((msg.position, claim["generation"], claim["member"]))
                tail.floor = max(tail.floor, claim["generation"])
                tail.generation = max(tail.generation, claim["generation"])
            continue
        value = decode(msg.value)[1]
        generation, applied, part = value["generation"], value["input_position"], value["part"]
        if first:
            tail.first_generation = generation
        tail.generation = max(tail.generation, generation)
        if pending is not None and (part != expected or pending.generation != generation
                                    or pending.applied != applied):
            tail.torn += 1  # a checkpoint whose remaining parts never came
            pending = None
        if part != 0 and pending is None:
            continue  # the rest of a torn checkpoint, or one begun before `after`
        if generation < tail.floor:
            continue  # a zombie's write after a newer owner claimed the partition
        if next_fence < len(fences) and applied >= void_from[next_fence]:
            continue  # rewound by a replay
        if pending is None:
            pending, expected = Checkpoint(generation, applied, value["previous"]), 0
        pending.tables.append((value["table"], *_entries(value)))
        expected += 1
        if expected == value["parts"]:
            yield pending
            pending = None
    if pending is not None:
        tail.torn += 1


def scan_claims(log: Log, topic: str, partition: int, tail: Tail) -> None:
    """Reads on from `tail` to the end for claims only (an owner reading back its own
    checkpoints before a snapshot): entries are passed over by their header."""
    for msg in log.read(topic, partition, tail.last_position):
        tail.last_position = msg.position
        if schema_name(msg.value) == CLAIM:
            claim = decode(msg.value)[1]
            tail.claims.append((msg.position, claim["generation"], claim["member"]))
            tail.floor = max(tail.floor, claim["generation"])
            tail.generation = max(tail.generation, claim["generation"])


def _entries(value: dict[str, Any]) -> tuple[list[str], list[str | None]]:
    """Keys and their values (None: deleted), from the packed columns or an older writer's
    arrays. A key is set or deleted once per message, so the order between the two is free."""
    if not value["count"] and not value["deleted_count"]:
        return value["keys"], value["values"]
    keys = unpack_text(value["key_column"], value["count"])
    values: list[str | None] = unpack_text(value["value_column"], value["count"])  # type: ignore[assignment]
    deleted = unpack_text(value["deleted_column"], value["deleted_count"])
    return keys + deleted, values + [None] * len(deleted)


def read_changes(log: Log, topic: str, partition: int
                 ) -> Iterator[tuple[str, int, list[str], list[str | None]]]:
    """(table, input position, keys, values) of every valid entry, oldest first (tools,
    tests): what a restore from the start of the changelog applies."""
    for checkpoint in read_checkpoints(log, topic, partition, None, Tail()):
        for table, keys, values in checkpoint.tables:
            yield table, checkpoint.applied, keys, values

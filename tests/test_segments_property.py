"""Property tests of the audience segments fold (pure: no log, no files).

Input messages are built the way the importer builds them (rows partitioned by murmur2 of
the user id, packed per partition into AudienceRows values of up to K rows, then one
EndMarker per partition), delivered to `AudienceSegments.process` in generated orders with
duplicated deliveries, one PartitionStore per partition. The folded membership must equal
an independent fold of the input, and the outputs must describe exactly the real changes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import processors.segments as segments_module
from connectors.change_sink import ChangeSink
from connectors.object_store import LocalObjectStore
from connectors.s3_sink import S3Sink
from processors.segments import (
    AudienceSegments,
    BatchProgress,
    decode_memberships,
    decode_progress,
    encode_memberships,
    encode_progress,
)
from streams.api import Input, Output
from streams.state.store import PartitionStore
from tests.support import expected_members
from topics.columns import read_columns, write_columns
from topics.partitioner import partition_for
from topics.spec import CHANGES, EVENTS

Row = tuple[str, str, str]  # (user_id, segment_id, op)

USERS = [f"user-{i}" for i in range(9)]
SEGMENTS = ["seg-a", "seg-b", "seg-c"]

row_st = st.tuples(st.sampled_from(USERS), st.sampled_from(SEGMENTS),
                   st.sampled_from(["add", "remove"]))
rows_st = st.lists(row_st, max_size=60)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Batch:
    batch_id: str
    mode: str
    rows: list[Row]


@dataclass(frozen=True)
class Message:
    """One message on the rows topic; `ident` names it so duplicates can be recognised."""

    ident: tuple[Any, ...]
    schema: str
    value: dict[str, Any]


def pack(batch: Batch, partitions: int, k: int) -> dict[int, list[Message]]:
    """The rows messages of a batch per partition, as the importer's `_spool_chunk` packs
    them (seqs are the 1-based row numbers of the file)."""
    cols: dict[int, tuple[list[int], list[str], list[str], list[str]]] = {
        p: ([], [], [], []) for p in range(partitions)}
    for seq, (user, segment, op) in enumerate(batch.rows, start=1):
        c = cols[partition_for(user, partitions)]
        c[0].append(seq)
        c[1].append(user)
        c[2].append(segment)
        c[3].append(op)
    out: dict[int, list[Message]] = {}
    for p, (seqs, users, segs, ops) in cols.items():
        out[p] = [
            Message((batch.batch_id, p, "rows", k, start), "AudienceRows", {
                "batch_id": batch.batch_id, "mode": batch.mode,
                **write_columns(seqs[start:start + k], users[start:start + k],
                                segs[start:start + k], ops[start:start + k]),
                "attributes": None})
            for start in range(0, len(seqs), k)
        ]
    return out


def end_markers(batch: Batch, partitions: int) -> dict[int, Message]:
    """One EndMarker per partition, as the importer's `_end_markers` writes them."""
    counts = Counter(partition_for(user, partitions) for user, _s, _o in batch.rows)
    segments = sorted({segment for _u, segment, _o in batch.rows})
    return {
        p: Message((batch.batch_id, p, "end"), "EndMarker", {
            "batch_id": batch.batch_id, "partition": p, "count": counts[p],
            "total": len(batch.rows), "mode": batch.mode, "segments": segments,
            "source_position": -1})
        for p in range(partitions)
    }


def batch_queues(batch: Batch, partitions: int, k: int, resend: dict[int, tuple[int, int]]
                 ) -> dict[int, list[Message]]:
    """Per partition, a batch's messages in its own order: rows, then the end marker.
    `resend[p] = (j, k2)`: an interrupted import published the first j messages (packed
    with k2) before the import was run again in full (the resumed import re-sends rows)."""
    packed = pack(batch, partitions, k)
    markers = end_markers(batch, partitions)
    queues = {}
    for p in range(partitions):
        prefix: list[Message] = []
        if p in resend:
            j, k2 = resend[p]
            prefix = pack(batch, partitions, k2)[p][:j]
        queues[p] = [*prefix, *packed[p], markers[p]]
    return queues


@dataclass
class Run:
    """What one delivery schedule produced."""

    stores: dict[int, PartitionStore]
    outputs: dict[int, list[Output]] = field(default_factory=dict)

    def members(self) -> set[tuple[str, str]]:
        return {(segment, user)
                for store in self.stores.values()
                for user, memberships in store.data["members"].items()
                for segment, _batch in memberships}


def deliver(schedule: dict[int, list[Message]], processor: AudienceSegments | None = None
            ) -> Run:
    """Feeds each partition's messages to the processor at increasing positions."""
    processor = processor or AudienceSegments()
    run = Run({p: PartitionStore(AudienceSegments.tables) for p in schedule})
    for p, messages in schedule.items():
        store, outs = run.stores[p], run.outputs.setdefault(p, [])
        for position, msg in enumerate(messages):
            record = Input(msg.schema, msg.value, p, position, 1_000 + position)
            outs.extend(processor.process(store.views, record))
    return run


def with_duplicates(data: st.DataObject, messages: list[Message], max_dups: int = 6
                    ) -> list[Message]:
    """Re-delivers some messages, each at a later point than the delivery it repeats."""
    out = list(messages)
    for _ in range(data.draw(st.integers(0, max_dups), label="duplicates")):
        if not out:
            break
        i = data.draw(st.integers(0, len(out) - 1), label="repeat")
        j = data.draw(st.integers(i + 1, len(out)), label="at")
        out.insert(j, out[i])
    return out


def interleave(data: st.DataObject, queues: list[list[Message]]) -> list[Message]:
    """A random merge of the queues that keeps each queue's own order."""
    queues = [list(q) for q in queues if q]
    out: list[Message] = []
    while queues:
        i = data.draw(st.integers(0, len(queues) - 1), label="next batch")
        out.append(queues[i].pop(0))
        if not queues[i]:
            queues.pop(i)
    return out


def draw_batches(data: st.DataObject, modes: list[str]) -> list[Batch]:
    count = data.draw(st.integers(1, 3), label="batches")
    return [Batch(f"b{i}", data.draw(st.sampled_from(modes), label="mode"),
                  data.draw(rows_st, label="rows")) for i in range(count)]


def draw_resend(data: st.DataObject, batch: Batch, partitions: int, k: int
                ) -> dict[int, tuple[int, int]]:
    if not data.draw(st.booleans(), label="resent import"):
        return {}
    k2 = data.draw(st.integers(1, 7), label="resent k")
    full = pack(batch, partitions, k2)
    return {p: (data.draw(st.integers(0, len(full[p])), label="resent prefix"), k2)
            for p in range(partitions)}


def in_partition(members: set[tuple[str, str]], p: int, partitions: int) -> set[tuple[str, str]]:
    return {(s, u) for s, u in members if partition_for(u, partitions) == p}


def first_delivery_fold(messages: list[Message]) -> set[tuple[str, str]]:
    """Add/remove batches only: each (segment, user) ends as the last op of its rows, taken
    in the order rows were first delivered (re-delivered rows are skipped by seq)."""
    members: set[tuple[str, str]] = set()
    seen: set[tuple[str, int]] = set()
    for msg in messages:
        if msg.schema != "AudienceRows":
            continue
        v, rows = msg.value, read_columns(msg.value)
        for seq, user, segment, op in zip(rows.seqs, rows.user_ids, rows.segment_ids, rows.ops,
                                          strict=True):
            if (v["batch_id"], seq) in seen:
                continue
            seen.add((v["batch_id"], seq))
            if op == "add":
                members.add((segment, user))
            else:
                members.discard((segment, user))
    return members


def check_outputs(run: Run, batches: list[Batch], partitions: int) -> None:
    """Outputs, per partition: every change is real and folds to the final membership; one
    EndMarker per batch whose count is the batch's changes there; one partition_applied."""
    rows_in = {(b.batch_id, p): sum(1 for u, _s, _o in b.rows if partition_for(u, partitions) == p)
               for b in batches for p in range(partitions)}
    for p, outs in run.outputs.items():
        folded: set[tuple[str, str]] = set()
        changes: Counter[str] = Counter()
        markers: dict[str, dict[str, Any]] = {}
        applied: dict[str, dict[str, Any]] = {}
        for out in outs:
            if out.schema == "SegmentChanges":
                assert out.topic == CHANGES and out.partition == p
                v = out.value
                assert v["batch_id"] not in markers, "a change after its batch's end marker"
                rows = read_columns(v)
                assert len(rows) > 0
                for user, segment, op in zip(rows.user_ids, rows.segment_ids, rows.ops,
                                             strict=True):
                    assert partition_for(user, partitions) == p
                    if op == "add":
                        assert (segment, user) not in folded, f"add of a member {segment, user}"
                        folded.add((segment, user))
                    else:
                        assert op == "remove"
                        assert (segment, user) in folded, f"remove of a non-member {segment, user}"
                        folded.discard((segment, user))
                changes[v["batch_id"]] += len(rows)
            elif out.schema == "EndMarker":
                assert out.topic == CHANGES and out.partition == p
                assert out.value["batch_id"] not in markers, "two end markers for one batch"
                markers[out.value["batch_id"]] = out.value
            else:
                assert out.schema == "BatchEvent" and out.topic == EVENTS
                assert out.value["kind"] == "partition_applied", out.value
                assert out.value["partition"] == p
                assert out.value["batch_id"] not in applied
                applied[out.value["batch_id"]] = out.value
        assert folded == in_partition(run.members(), p, partitions)
        assert set(markers) == set(applied) == {b.batch_id for b in batches}
        for batch_id, marker in markers.items():
            assert marker["count"] == changes[batch_id]
            assert marker["partition"] == p
            assert applied[batch_id]["changes"] == changes[batch_id]
            assert applied[batch_id]["rows"] == rows_in[(batch_id, p)]
    # The progress table agrees: every batch done everywhere, its rows counted once.
    for p, store in run.stores.items():
        for b in batches:
            progress = store.data["batches"][b.batch_id]
            assert progress.done and progress.applied == rows_in[(b.batch_id, p)]
        assert all(store.data["members"].values()), "an empty membership tuple is stored"


# --------------------------------------------------------------------- sequential batches


@SETTINGS
@given(data=st.data())
def test_sequential_batches_fold_to_expected_members(data: st.DataObject) -> None:
    """Batches one after the other in each partition (the order may differ between
    partitions), re-sent imports and duplicated deliveries: membership per partition equals
    the direct fold of the batches in the order their end markers came there."""
    partitions = data.draw(st.integers(1, 5), label="partitions")
    k = data.draw(st.integers(1, 7), label="k")
    batches = draw_batches(data, ["add", "remove", "replace"])
    queues = {b.batch_id: batch_queues(b, partitions, k, draw_resend(data, b, partitions, k))
              for b in batches}
    schedule: dict[int, list[Message]] = {}
    orders: dict[int, list[Batch]] = {}
    for p in range(partitions):
        orders[p] = data.draw(st.permutations(batches), label="batch order")
        base = [msg for b in orders[p] for msg in queues[b.batch_id][p]]
        schedule[p] = with_duplicates(data, base)
    run = deliver(schedule)
    for p in range(partitions):
        want = expected_members([(b.mode, b.rows) for b in orders[p]])
        assert in_partition(run.members(), p, partitions) == in_partition(want, p, partitions)
    if all(orders[p] == batches for p in range(partitions)):
        assert run.members() == expected_members([(b.mode, b.rows) for b in batches])
    check_outputs(run, batches, partitions)


# -------------------------------------------------------------------- interleaved batches


@SETTINGS
@given(data=st.data())
def test_interleaved_add_remove_batches_fold_per_user_in_delivery_order(
        data: st.DataObject) -> None:
    """add/remove batches whose messages interleave within a partition (each batch's own
    messages in order, its end marker after its rows), with duplicated deliveries: each
    user's memberships are the fold of that user's rows in the order of first delivery."""
    partitions = data.draw(st.integers(1, 5), label="partitions")
    k = data.draw(st.integers(1, 7), label="k")
    batches = draw_batches(data, ["add", "remove"])
    queues = {b.batch_id: batch_queues(b, partitions, k, draw_resend(data, b, partitions, k))
              for b in batches}
    schedule = {p: with_duplicates(data, interleave(data, [queues[b.batch_id][p]
                                                           for b in batches]))
                for p in range(partitions)}
    run = deliver(schedule)
    for p in range(partitions):
        assert in_partition(run.members(), p, partitions) == first_delivery_fold(schedule[p])
    check_outputs(run, batches, partitions)


@SETTINGS
@given(data=st.data())
def test_duplicates_change_nothing(data: st.DataObject) -> None:
    """The same schedule with and without re-deliveries: same state, same outputs apart
    from the positions they were made at."""
    partitions = data.draw(st.integers(1, 5), label="partitions")
    k = data.draw(st.integers(1, 7), label="k")
    batches = draw_batches(data, ["add", "remove", "replace"])
    queues = {b.batch_id: batch_queues(b, partitions, k, {}) for b in batches}
    clean = {p: [m for b in batches for m in queues[b.batch_id][p]] for p in range(partitions)}
    noisy = {p: with_duplicates(data, msgs, max_dups=10) for p, msgs in clean.items()}
    a, b = deliver(clean), deliver(noisy)
    assert {p: s.data for p, s in a.stores.items()} == {p: s.data for p, s in b.stores.items()}

    def strip(run: Run) -> dict[int, list[tuple[str, dict[str, Any]]]]:
        return {p: [(o.schema, {key: val for key, val in o.value.items()
                                if key not in ("source_position", "at_ms")}) for o in outs]
                for p, outs in run.outputs.items()}

    assert strip(a) == strip(b)


# ----------------------------------------------------------------- detected loss (count)


@SETTINGS
@given(data=st.data())
def test_end_marker_count_mismatch_fails_the_batch(data: st.DataObject) -> None:
    """A partition whose end marker counts more (a lost message) or fewer rows than arrived
    emits a `failed` event naming the partition and both numbers, and forwards its end
    marker with the changes it made (no replace removals), so that the sinks write and
    merge what was applied."""
    partitions = data.draw(st.integers(1, 5), label="partitions")
    k = data.draw(st.integers(1, 7), label="k")
    rows = data.draw(rows_st.filter(bool), label="rows")
    batch = Batch("b-loss", data.draw(st.sampled_from(["add", "remove", "replace"])), rows)
    queues = batch_queues(batch, partitions, k, {})
    p = data.draw(st.sampled_from([q for q in range(partitions) if len(queues[q]) > 1]
                                  or [0]), label="partition")
    messages = list(queues[p])
    marker = messages[-1]
    count = marker.value["count"]
    if count and data.draw(st.booleans(), label="lose a message"):
        lost = messages.pop(data.draw(st.integers(0, len(messages) - 2), label="lost"))
        applied = count - len(read_columns(lost.value))
    else:
        applied = count
        count += data.draw(st.sampled_from([-1, 1, 7]).filter(lambda d: count + d >= 0))
        messages[-1] = Message(marker.ident, "EndMarker", {**marker.value, "count": count})
    # And any message re-delivered afterwards changes nothing.
    messages += data.draw(st.lists(st.sampled_from(messages), max_size=3), label="late")
    run = deliver({p: messages})
    events = [o for o in run.outputs[p] if o.schema == "BatchEvent"]
    assert len(events) == 1
    event = events[0]
    assert event.topic == EVENTS and event.key == "b-loss"
    assert event.value["kind"] == "failed" and event.value["partition"] == p
    assert event.value["step"] == "segments"
    error = event.value["error"]
    assert f"partition {p}" in error and "b-loss" in error
    assert f"holds {applied} records" in error and f"end marker says {count}" in error
    (forwarded,) = [o for o in run.outputs[p] if o.schema == "EndMarker"]
    made = [o for o in run.outputs[p] if o.schema == "SegmentChanges"]
    assert forwarded.topic == CHANGES and forwarded.partition == p
    assert forwarded.value["count"] == sum(len(read_columns(o.value)) for o in made)
    assert forwarded.value["source_position"] == next(  # delivered at its index
        i for i, m in enumerate(messages) if m.schema == "EndMarker")
    assert all(-1 not in read_columns(o.value).seqs for o in made)  # no replace removals
    assert run.outputs[p].index(forwarded) < run.outputs[p].index(event)
    assert run.stores[p].data["batches"]["b-loss"].done


def test_end_marker_count_mismatch_example() -> None:
    """Regression: a detected loss failed the batch without forwarding the end marker, so
    the sinks never wrote nor merged what the state had applied (and the warehouse, which
    merges a partition in log order, would diverge from the state)."""
    batch = Batch("b1", "add", [("user-1", "seg-a", "add"), ("user-1", "seg-b", "add")])
    p = partition_for("user-1", 3)
    queue = batch_queues(batch, 3, 1, {})[p]
    lost = [queue[0], queue[2]]  # the second rows message never arrived
    run = deliver({p: lost})
    (changes, forwarded, event) = run.outputs[p]
    assert read_columns(changes.value).user_ids == ["user-1"]
    assert (forwarded.schema, forwarded.value["count"]) == ("EndMarker", 1)
    assert event.value["kind"] == "failed"
    assert event.value["error"] == (f"partition {p} of audience.rows holds 1 records of batch "
                                    "b1 but its end marker says 2")


# ------------------------------------------------------------------ replace, by example


def test_replace_end_marker_removes_unlisted_members_of_named_segments_only() -> None:
    first = Batch("b1", "add", [("user-1", "seg-a", "add"), ("user-2", "seg-a", "add"),
                                ("user-3", "seg-b", "add")])
    second = Batch("b2", "replace", [("user-2", "seg-a", "add"), ("user-4", "seg-a", "add")])
    q1, q2 = batch_queues(first, 1, 2, {}), batch_queues(second, 1, 2, {})
    run = deliver({0: [*q1[0], *q2[0]]})
    assert run.members() == {("seg-a", "user-2"), ("seg-a", "user-4"), ("seg-b", "user-3")}
    changes = [o.value for o in run.outputs[0] if o.schema == "SegmentChanges"]
    # b2's rows add user-4 only (user-2 is re-affirmed); its end marker removes user-1.
    assert [(c["batch_id"], read_columns(c).user_ids, read_columns(c).ops)
            for c in changes[-2:]] == [
        ("b2", ["user-4"], ["add"]), ("b2", ["user-1"], ["remove"])]
    assert read_columns(changes[-1]).seqs == [-1]


def test_replace_removals_span_messages_whose_stamps_rise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: all of a replace end marker's removals went out in one message, which
    for a large partition outgrew Kafka's message limit. Now they are split into parts, and
    the sinks' stamps (source position, part; end marker last) keep every part."""
    monkeypatch.setattr(segments_module, "REMOVALS_PER_MESSAGE", 2)
    first = Batch("b1", "add", [(f"user-{i}", "seg-a", "add") for i in range(6)])
    second = Batch("b2", "replace", [("user-0", "seg-a", "add")])
    run = deliver({0: [*batch_queues(first, 1, 10, {})[0], *batch_queues(second, 1, 10, {})[0]]})
    last = [o for o in run.outputs[0] if o.value.get("batch_id") == "b2"
            and o.schema in ("SegmentChanges", "EndMarker")]
    assert [(o.schema, o.value.get("part")) for o in last] == [
        ("SegmentChanges", 0), ("SegmentChanges", 1), ("SegmentChanges", 2), ("EndMarker", None)]
    assert [u for o in last[:-1] for u in read_columns(o.value).user_ids] == [
        f"user-{i}" for i in range(1, 6)]
    assert last[-1].value["count"] == 5
    sink = ChangeSink(S3Sink(LocalObjectStore(Path("/nonexistent"))), partitions=1)
    stamps = [sink.stamp(Input(o.schema, o.value, 0, 99, 0)) for o in last]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


# --------------------------------------------------------------- encodings and changelog


pair_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)


@given(st.lists(st.tuples(pair_text, pair_text), min_size=1, max_size=8).map(tuple))
def test_memberships_round_trip(value: tuple[tuple[str, str], ...]) -> None:
    # Never empty: the processor deletes a user rather than store no membership (asserted in
    # check_outputs), and "" would decode as one membership with an empty segment.
    assert decode_memberships(encode_memberships(value)) == value


@given(st.builds(BatchProgress, st.integers(0, 2**62), st.integers(0, 2**62),
                 st.integers(0, 2**62), st.booleans()))
def test_progress_round_trip(value: BatchProgress) -> None:
    assert decode_progress(encode_progress(value)) == value


def _replica_of(store: PartitionStore, replica: PartitionStore) -> None:
    for table, entries in store.take_dirty().items():
        for key, encoded in entries:
            replica.load(table, key, encoded)


@SETTINGS
@given(data=st.data())
def test_store_rebuilt_from_changelog_equals_original(data: st.DataObject) -> None:
    """Changelog round trip: entries taken by take_dirty() at random checkpoints and loaded
    into a fresh store rebuild it exactly; a processor restarted on the rebuilt store (a new
    instance, as after a crash) ends where an uninterrupted one ends."""
    partitions = 1
    k = data.draw(st.integers(1, 7), label="k")
    batches = draw_batches(data, ["add", "remove", "replace"])
    messages = with_duplicates(data, [m for b in batches
                                      for m in batch_queues(b, partitions, k, {})[0]])
    reference = deliver({0: messages})

    store = PartitionStore(AudienceSegments.tables)
    replica = PartitionStore(AudienceSegments.tables)
    processor = AudienceSegments()
    outputs: list[Output] = []
    for position, msg in enumerate(messages):
        outputs += processor.process(store.views, Input(msg.schema, msg.value, 0, position,
                                                        1_000 + position))
        if data.draw(st.booleans(), label="checkpoint"):
            _replica_of(store, replica)
            assert replica.data == store.data
            if data.draw(st.booleans(), label="restart"):
                # The crashed worker's store is gone: go on from what the changelog holds.
                store, replica = replica, PartitionStore(AudienceSegments.tables)
                for table, rows in store.data.items():
                    for key, value in rows.items():
                        replica.data[table][key] = value
                processor = AudienceSegments()
    _replica_of(store, replica)
    assert replica.data == store.data == reference.stores[0].data
    assert outputs == reference.outputs[0]
    assert store.take_dirty() == {}


def test_take_dirty_encodes_deletes_as_none_and_clears() -> None:
    store = PartitionStore(AudienceSegments.tables)
    members = store.views["members"]
    members.set("user-1", (("seg-a", "b1"),))
    members.set("user-2", (("seg-a", "b1"), ("seg-b", "b1")))
    members.delete("user-1")
    members.delete("user-9")  # absent: nothing to log
    store.views["batches"].set("b1", BatchProgress(3, 2, 1, True))
    dirty = store.take_dirty()
    assert dict(dirty["members"]) == {"user-1": None,
                                      "user-2": "seg-a\x1fb1\x1eseg-b\x1fb1"}
    assert dirty["batches"] == [("b1", "3,2,1,1")]
    assert store.take_dirty() == {}
    rebuilt = PartitionStore(AudienceSegments.tables)
    rebuilt.load("members", "user-1", "seg-z\x1fb0")  # an older entry, deleted below
    for table, entries in dirty.items():
        for key, encoded in entries:
            rebuilt.load(table, key, encoded)
    assert rebuilt.data == store.data


def test_grouping_of_outputs_is_per_partition() -> None:
    """Sanity of the harness: users of one batch spread over partitions as partition_for
    says, and each partition's end marker counts that partition's rows."""
    rows = [(u, "seg-a", "add") for u in USERS]
    batch = Batch("b1", "add", rows)
    markers = end_markers(batch, 4)
    by_partition: dict[int, int] = defaultdict(int)
    for u in USERS:
        by_partition[partition_for(u, 4)] += 1
    assert {p: m.value["count"] for p, m in markers.items()} == {
        p: by_partition[p] for p in range(4)}
    assert all(m.value["total"] == len(USERS) for m in markers.values())

"""State tables: PartitionStore dirty tracking, the changelog written to and restored from a
real EmbeddedLog, and replay planning / rewinding on a small log."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import pytest

import streams.state.changelog as changelog
from streams.api import Input, Output, TableSpec
from streams.replay import ReplayPlan, SinkGroup, plan, rewind
from streams.state.changelog import read_changes, write_checkpoint
from streams.state.recovery import restore
from streams.state.store import PartitionStore
from topics.backends.embedded.log import EmbeddedLog
from topics.codec import MAGIC, REGISTRY, decode, encode
from topics.columns import write_columns
from topics.log import GroupBusyError, TopicPartition
from topics.spec import TopicSpec

MEMBERS = TableSpec("members", encode=json.dumps, decode=json.loads)
COUNTS = TableSpec("counts", encode=str, decode=int)
SPECS = (MEMBERS, COUNTS)


@pytest.fixture
def log(tmp_path: Path):
    lg = EmbeddedLog(tmp_path / "data")
    lg.ensure_topics([TopicSpec("in", 2, ("AudienceRows", "EndMarker")),
                      TopicSpec("cl", 2, ("Changelog",), changelog=True),
                      TopicSpec("out", 2, ("SegmentChanges", "EndMarker")),
                      TopicSpec("empty", 3, ())])
    yield lg
    lg.close()


# -- PartitionStore ------------------------------------------------------------------------

def test_writes_are_dirty_until_taken_and_encoded() -> None:
    store = PartitionStore(SPECS)
    members, counts = store.views["members"], store.views["counts"]
    assert store.take_dirty() == {}
    members.set("u1", ["s1"])
    members.set("u2", ["s2"])
    counts.set("s1", 1)
    assert members.get("u1") == ["s1"]
    assert len(members) == 2
    assert store.take_dirty() == {"members": [("u1", '["s1"]'), ("u2", '["s2"]')],
                                  "counts": [("s1", "1")]}
    assert store.take_dirty() == {}  # taken: nothing is dirty any more
    assert store.data == {"members": {"u1": ["s1"], "u2": ["s2"]}, "counts": {"s1": 1}}

    # the last write of a key wins, a delete is a None entry, tables without changes are left out
    members.set("u1", ["s1", "s3"])
    members.set("u1", ["s3"])
    members.delete("u2")
    assert store.take_dirty() == {"members": [("u1", '["s3"]'), ("u2", None)]}
    assert dict(members.items()) == {"u1": ["s3"]}
    assert members.get("u2") is None


def test_delete_of_a_missing_key_is_not_a_change_but_set_then_delete_is() -> None:
    store = PartitionStore(SPECS)
    counts = store.views["counts"]
    counts.delete("never-there")
    assert store.take_dirty() == {}
    counts.set("new", 5)
    counts.delete("new")  # created and deleted inside one checkpoint
    assert store.take_dirty() == {"counts": [("new", None)]}
    assert len(counts) == 0


def test_load_is_not_dirty() -> None:
    store = PartitionStore(SPECS)
    store.load("members", "u1", '["s1"]')
    store.load("counts", "s1", "4")
    store.load("members", "u1", None)
    store.load("members", "gone", None)  # deleting a missing key during restore is fine
    assert store.take_dirty() == {}
    assert store.data == {"members": {}, "counts": {"s1": 4}}
    assert store.applied is None


# -- changelog through a real log ------------------------------------------------------------

def _checkpoint(log: EmbeddedLog, store: PartitionStore, partition: int, applied: int) -> None:
    producer = log.producer()
    write_checkpoint(producer, "cl", partition, applied, 0, store.take_dirty())
    producer.flush()


def test_restore_rebuilds_the_store_and_applied_stamp(log: EmbeddedLog) -> None:
    store = PartitionStore(SPECS)
    members, counts = store.views["members"], store.views["counts"]
    members.set("u1", ["s1"])
    members.set("u2", ["s1", "s2"])
    counts.set("s1", 2)
    _checkpoint(log, store, 1, applied=100)
    members.delete("u1")
    members.set("u3", ["s2"])
    counts.set("s2", 2)
    counts.set("s1", 1)
    _checkpoint(log, store, 1, applied=250)

    restored = restore(log, "cl", 1, SPECS)[0]
    assert restored.data == store.data
    assert restored.data == {"members": {"u2": ["s1", "s2"], "u3": ["s2"]},
                             "counts": {"s1": 1, "s2": 2}}
    assert restored.applied == 250
    assert restored.take_dirty() == {}

    # the other partition's changelog is its own
    other = restore(log, "cl", 0, SPECS)[0]
    assert other.data == {"members": {}, "counts": {}} and other.applied is None

    # entries as they are on the topic, oldest first
    entries = list(read_changes(log, "cl", 1))
    assert [(table, applied) for table, applied, _k, _v in entries] == [
        ("members", 100), ("counts", 100), ("members", 250), ("counts", 250)]
    # keys set first, then keys deleted: a key changes once per message, so order is free
    assert entries[2][2:] == (["u3", "u1"], ['["s2"]', None])


def test_changes_over_the_byte_limit_are_split_under_it(log: EmbeddedLog) -> None:
    """Regression: 20,000 entries with long values made a 1.26 MB changelog message, which
    the Kafka producer refused (1 MiB limit) on a 1M-row benchmark."""
    store = PartitionStore(SPECS)
    for i in range(3000):
        store.views["members"].set(f"user-{i:06d}", [f"segment-{i % 7}-" + "x" * 400])
    store.views["members"].delete("user-000010")
    _checkpoint(log, store, 0, applied=5)
    sizes = [len(m.value) for m in log.read("cl", 0)]
    assert len(sizes) > 2 and max(sizes) <= changelog.MAX_BYTES
    restored = restore(log, "cl", 0, SPECS)[0]
    assert restored.data["members"] == store.data["members"]
    assert len(restored.data["members"]) == 2999 and restored.applied == 5


def test_an_older_writers_changelog_is_restored(log: EmbeddedLog) -> None:
    """Changelog.v1 carried keys and values as Avro arrays, null for a deletion."""
    (v1,) = [w for w in REGISTRY.writers.values() if w.name == "Changelog"
             and "keys" in {f["name"] for f in w.parsed["fields"]}
             and "count" not in {f["name"] for f in w.parsed["fields"]}]
    producer = log.producer()
    for applied, keys, values in ((5, ["s1", "s2"], ["1", "2"]), (9, ["s1", "s3"], [None, "3"])):
        buf = io.BytesIO()
        buf.write(MAGIC + v1.fingerprint)
        fastavro.schemaless_writer(buf, v1.parsed, {"table": "counts", "input_position": applied,
                                                    "keys": keys, "values": values})
        producer.send("cl", 0, buf.getvalue())
    write_checkpoint(producer, "cl", 0, 12, 0, {"counts": [("s2", "20"), ("s3", None)]})
    producer.flush()
    restored = restore(log, "cl", 0, SPECS)[0]
    assert restored.data["counts"] == {"s2": 20}
    assert restored.applied == 12


def test_applied_is_the_highest_stamp(log: EmbeddedLog) -> None:
    producer = log.producer()
    for applied in (10, 40, 30):
        write_checkpoint(producer, "cl", 0, applied, 0, {"counts": [("k", str(applied))]})
    producer.flush()
    restored = restore(log, "cl", 0, SPECS)[0]
    assert restored.applied == 40
    assert restored.data["counts"] == {"k": 30}  # values: last write wins, in log order


def test_big_changes_are_split_and_every_part_is_stamped(
        log: EmbeddedLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changelog, "MAX_ENTRIES", 3)
    store = PartitionStore(SPECS)
    for i in range(8):
        store.views["counts"].set(f"k{i}", i)
    _checkpoint(log, store, 0, applied=77)
    entries = list(read_changes(log, "cl", 0))
    assert [(len(keys), applied) for _t, applied, keys, _v in entries] == [
        (3, 77), (3, 77), (2, 77)]
    restored = restore(log, "cl", 0, SPECS)[0]
    assert restored.data["counts"] == {f"k{i}": i for i in range(8)}
    assert restored.applied == 77


def test_entries_for_an_unknown_table_are_a_clear_error(log: EmbeddedLog) -> None:
    producer = log.producer()
    write_checkpoint(producer, "cl", 0, 5, 0, {"members": [("u", "[]")], "retired": [("x", "1")]})
    producer.flush()
    with pytest.raises(ValueError, match=r"cl\[0\].*unknown table 'retired'") as err:
        restore(log, "cl", 0, SPECS)[0]
    assert "counts" in str(err.value) and "members" in str(err.value)


# -- replay ---------------------------------------------------------------------------------

def _rows(batch: str, seq: int) -> bytes:
    return encode("AudienceRows", {"batch_id": batch, "mode": "add",
                                   **write_columns([seq], [f"u{seq}"], ["s"], ["add"])})


def _fill_input(log: EmbeddedLog) -> dict[int, list[tuple[int, str]]]:
    """Partition 0: b1 b1 b2 b2; partition 1: b1 b3. Returns (position, batch) per partition."""
    producer = log.producer()
    layout = {0: ["b1", "b1", "b2", "b2"], 1: ["b1", "b3"]}
    for p, batches in layout.items():
        for seq, batch in enumerate(batches):
            producer.send("in", p, _rows(batch, seq))
    producer.flush()
    return {p: [(m.position, decode(m.value)[1]["batch_id"]) for m in log.read("in", p)]
            for p in layout}


def test_plan_earliest_position_and_batch(log: EmbeddedLog) -> None:
    pos = _fill_input(log)
    assert plan(log, "in", "earliest").starts == {0: pos[0][0][0], 1: pos[1][0][0]}

    # position:N: every partition from its first message at or after N
    third = pos[0][2][0]
    assert plan(log, "in", f"position:{third}").starts == {0: third, 1: None}
    second = pos[0][1][0]
    assert plan(log, "in", f"position:{second}").starts == {0: second, 1: pos[1][1][0]}
    assert plan(log, "in", f"position:{second - 1}").starts == {0: second, 1: pos[1][1][0]}
    assert plan(log, "in", "position:0").starts == {0: 0, 1: 0}

    assert plan(log, "in", "batch:b1").starts == {0: 0, 1: 0}
    assert plan(log, "in", "batch:b2").starts == {0: pos[0][2][0], 1: None}
    assert plan(log, "in", "batch:b3").starts == {0: None, 1: pos[1][1][0]}
    assert plan(log, "in", "batch:b2").description == "batch:b2"


def test_plan_refuses_what_it_cannot_resolve(log: EmbeddedLog) -> None:
    _fill_input(log)
    with pytest.raises(ValueError, match="no message of batch nope on in"):
        plan(log, "in", "batch:nope")
    with pytest.raises(ValueError, match="expected a whole number"):
        plan(log, "in", "position:abc")
    with pytest.raises(ValueError, match=r"expected earliest, position:N, .*sequence:SEQ"):
        plan(log, "in", "latest")


def test_plan_on_empty_topic(log: EmbeddedLog) -> None:
    assert plan(log, "empty", "earliest").starts == {0: None, 1: None, 2: None}
    assert plan(log, "empty", "position:5").starts == {0: None, 1: None, 2: None}


def test_plan_refuses_a_bad_start_on_an_empty_topic(log: EmbeddedLog) -> None:
    """BUG: `plan` checks the kind of start only inside the loop over messages, so on an
    empty topic (or empty partitions) a typo like `latest` or `position:abc` is accepted
    and replays nothing instead of failing like it does on a non-empty topic."""
    with pytest.raises(ValueError, match=r"expected earliest, position:N, .*sequence:SEQ"):
        plan(log, "empty", "latest")
    with pytest.raises(ValueError, match="expected a whole number"):
        plan(log, "empty", "position:abc")


@dataclass
class ToyProcessor:
    name: str = "toy"
    input_topic: str = "in"
    changelog_topic: str = "cl"
    tables: tuple[TableSpec[Any], ...] = SPECS

    def process(self, tables: dict[str, Any], record: Input) -> list[Output]:
        return []


def _fill_changelog_and_output(log: EmbeddedLog, inputs: list[tuple[int, str]]) -> None:
    """Partition 0: a changelog entry stamped at every input position; an output change per
    input and an end marker after each batch (stamped with its input position)."""
    producer = log.producer()
    for position, _batch in inputs:
        write_checkpoint(producer, "cl", 0, position, 0, {"counts": [(f"at{position}", "1")]})
    for i, (position, batch) in enumerate(inputs):
        producer.send("out", 0, encode("SegmentChanges", {
            "batch_id": batch, "source_position": position,
            **write_columns([i], ["u"], ["s"], ["add"])}))
        if i + 1 == len(inputs) or inputs[i + 1][1] != batch:
            producer.send("out", 0, encode("EndMarker", {
                "batch_id": batch, "partition": 0, "count": 2, "total": 2, "mode": "add",
                "segments": ["s"], "source_position": position}))
    producer.flush()


def test_rewind_refuses_while_a_member_is_live_then_rewinds(log: EmbeddedLog) -> None:
    pos = _fill_input(log)
    _fill_changelog_and_output(log, pos[0])
    replay = plan(log, "in", "batch:b2")
    start = replay.starts[0]
    assert start == pos[0][2][0]
    processor = ToyProcessor()
    sinks = [SinkGroup("sink", "out")]

    class Quiet:
        def on_assigned(self, tps: Any) -> None: ...
        def on_revoked(self, tps: Any) -> None: ...

    for group in ("proc", "sink"):
        member = log.consumer(group, [], Quiet(), member=f"{group}-worker")
        try:
            with pytest.raises(GroupBusyError, match=f"{group}: {group}-worker"):
                rewind(log, processor, "proc", sinks, replay)
        finally:
            member.close()
    # nothing was reset or cut while refused
    assert len(list(log.read("cl", 0))) == 4
    assert all(gp.committed is None for gp in log.group_positions("proc"))
    assert log.group_positions("sink") == []

    rewind(log, processor, "proc", sinks, replay)
    # the processor resumes after the message before the start
    assert log.group_positions("proc")[0].committed == pos[0][1][0]
    # a fence voids the changelog entries stamped at or after the start
    assert [applied for _t, applied, _k, _v in read_changes(log, "cl", 0)] == [
        pos[0][0][0], pos[0][1][0]]
    restored = restore(log, "cl", 0, SPECS)[0]
    assert restored.applied == pos[0][1][0]
    # the sink restarts after the last end marker made before the start (b1's)
    markers = {decode(m.value)[1]["batch_id"]: m.position for m in log.read("out", 0)
               if decode(m.value)[0] == "EndMarker"}
    b1_marker = markers["b1"]
    committed = {gp.tp: gp.committed for gp in log.group_positions("sink")}
    assert committed[TopicPartition("out", 0)] == b1_marker
    # partition 1 has no b2: nothing changed there
    assert TopicPartition("in", 1) not in {gp.tp for gp in log.group_positions("proc")
                                            if gp.committed is not None}


def test_rewind_from_the_first_message_voids_the_whole_changelog(log: EmbeddedLog) -> None:
    pos = _fill_input(log)
    _fill_changelog_and_output(log, pos[0])
    rewind(log, ToyProcessor(), "proc", [], ReplayPlan({0: 0, 1: None}, "earliest"))
    assert list(read_changes(log, "cl", 0)) == []
    gp = {g.tp.partition: g for g in log.group_positions("proc")}
    assert (gp[0].committed, gp[0].lag) == (None, 4)

"""Regression tests for the state holes of the effectively-once review (issue 7): torn
checkpoints, zombie owners, half-applied failed messages, snapshots; each fails on the code
before the fix. In-process against a real EmbeddedLog; the process-level versions (SIGKILL,
SIGSTOP) are in test_crash.py and test_zombies.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.object_store import LocalObjectStore
from streams.api import Input, Output, TableSpec
from streams.outputs import OutputWriter
from streams.processor_task import ProcessorTask, SnapshotPolicy
from streams.state.changelog import ENTRY, Tail, read_checkpoints, write_checkpoint, write_claim
from streams.state.recovery import HistoryLost, claim, restore
from streams.state.snapshots import Snapshot, SnapshotStore
from streams.state.store import PartitionStore
from topics.backends.embedded.groups import GroupDir
from topics.backends.embedded.log import EmbeddedLog
from topics.codec import decode, encode, schema_name
from topics.log import TopicPartition
from topics.spec import DEAD_LETTER, EVENTS, TopicSpec

COUNTS = TableSpec("counts", encode=str, decode=int)
SPECS = (COUNTS,)


@pytest.fixture
def log(tmp_path: Path):
    lg = EmbeddedLog(tmp_path / "data", session_timeout_s=0.5)
    lg.ensure_topics([TopicSpec("in", 1, ("BatchEvent",)),
                      TopicSpec("cl", 1, ("Changelog", "ChangelogClaim", "ChangelogFence"),
                                changelog=True),
                      TopicSpec(DEAD_LETTER, 1, ("DeadLetter",)),
                      TopicSpec(EVENTS, 2, ("BatchEvent",))])
    yield lg
    lg.close()


class _PartOnly:
    """A producer that loses every message after the first `keep` (a crash mid-write)."""

    def __init__(self, inner: Any, keep: int):
        self.inner, self.keep = inner, keep

    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> None:
        if self.keep > 0:
            self.inner.send(topic, partition, value, key)
        self.keep -= 1

    def flush(self) -> None:
        self.inner.flush()


# -- hole 5: torn checkpoints ---------------------------------------------------------------

def test_torn_checkpoint_restores_only_whole_checkpoints(log: EmbeddedLog,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import streams.state.changelog as changelog

    producer = log.producer()
    write_claim(producer, "cl", 0, 1, "A")
    write_checkpoint(producer, "cl", 0, 10, 1, {"counts": [("a", "1")]})
    monkeypatch.setattr(changelog, "MAX_ENTRIES", 100)  # 60,000 keys: 600 parts
    big = {"counts": [(f"k{i}", str(i)) for i in range(60_000)]}
    write_checkpoint(_PartOnly(producer, 100), "cl", 0, 20, 1, big)  # a sixth of it
    producer.flush()
    store, tail = restore(log, "cl", 0, SPECS)
    assert store.data["counts"] == {"a": 1}  # none of the torn checkpoint's keys
    assert store.applied == 10  # so inputs 11..20 are processed again
    assert tail.torn == 1
    # a whole checkpoint after the torn one is applied
    write_checkpoint(producer, "cl", 0, 30, 2, big)
    producer.flush()
    store, _tail = restore(log, "cl", 0, SPECS)
    assert len(store.data["counts"]) == 60_001 and store.applied == 30


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=8))
def test_any_mix_of_whole_and_torn_checkpoints_restores_the_whole_ones(
        tmp_path_factory: pytest.TempPathFactory, checkpoints: list[tuple[int, int]]) -> None:
    """For random checkpoints (n parts, of which `kept` reached the log), restore applies
    exactly the whole ones, in order."""
    import streams.state.changelog as changelog

    lg = EmbeddedLog(tmp_path_factory.mktemp("torn"))
    lg.ensure_topics([TopicSpec("cl", 1, ("Changelog",), changelog=True)])
    old = changelog.MAX_ENTRIES
    changelog.MAX_ENTRIES = 1
    try:
        expected: dict[str, int] = {}
        applied = None
        producer = lg.producer()
        write_claim(producer, "cl", 0, 1, "A")
        for i, (parts, kept) in enumerate(checkpoints):
            changes = {"counts": [(f"c{i}-{j}", str(i)) for j in range(parts)]}
            write_checkpoint(_PartOnly(producer, kept), "cl", 0, i, 1, changes)
            if kept >= parts:
                expected.update({k: i for k, _v in changes["counts"]})
                applied = i
        producer.flush()
        store, _tail = restore(lg, "cl", 0, SPECS)
        assert store.data["counts"] == expected
        assert store.applied == applied
    finally:
        changelog.MAX_ENTRIES = old
        lg.close()


# -- hole 6: zombies ------------------------------------------------------------------------

def test_zombie_writes_after_a_newer_claim_are_void(log: EmbeddedLog) -> None:
    producer = log.producer()
    a_store, a_tail = restore(log, "cl", 0, SPECS)
    claim(log, producer, "cl", 0, a_store, a_tail, "A")
    write_checkpoint(producer, "cl", 0, 5, a_store.generation, {"counts": [("k", "5")]})
    producer.flush()
    # A pauses; B takes the partition over, restores A's work and claims
    b_store, b_tail = restore(log, "cl", 0, SPECS)
    claim(log, producer, "cl", 0, b_store, b_tail, "B")
    assert b_store.generation == a_store.generation + 1
    assert b_store.data["counts"] == {"k": 5}
    # A wakes and flushes what it had: a newer value of k and a key B never saw
    write_checkpoint(producer, "cl", 0, 9, a_store.generation,
                     {"counts": [("k", "999"), ("zombie", "1")]})
    write_checkpoint(producer, "cl", 0, 7, b_store.generation, {"counts": [("b", "7")]})
    producer.flush()
    store, tail = restore(log, "cl", 0, SPECS)
    assert store.data["counts"] == {"k": 5, "b": 7}
    assert store.applied == 7
    assert tail.floor == b_store.generation


def test_a_claim_keeps_what_the_old_owner_wrote_between_the_restore_and_the_claim(
        log: EmbeddedLog) -> None:
    producer = log.producer()
    a_store, a_tail = restore(log, "cl", 0, SPECS)
    claim(log, producer, "cl", 0, a_store, a_tail, "A")
    b_store, b_tail = restore(log, "cl", 0, SPECS)
    # A flushes after B's read but before B's claim: still A's partition, valid
    write_checkpoint(producer, "cl", 0, 3, a_store.generation, {"counts": [("late", "3")]})
    producer.flush()
    claim(log, producer, "cl", 0, b_store, b_tail, "B")
    assert b_store.data["counts"] == {"late": 3} and b_store.applied == 3
    assert restore(log, "cl", 0, SPECS)[0].data["counts"] == {"late": 3}


def test_an_expired_member_loses_its_lease_and_cannot_commit(log: EmbeddedLog) -> None:
    gd = GroupDir(log.root, "g", session_timeout_s=0.5)
    tp = TopicPartition("in", 0)
    fd_a = gd.join("A")
    lease_a = gd.try_own(tp, "A")
    assert lease_a == ("A", 1)
    fd_b = gd.join("B")
    assert gd.try_own(tp, "B") is None  # A is live
    # A stops heartbeating (paused): its beat ages past the session timeout
    (gd.dir / "members" / "A.beat").write_text(repr(-1e9))
    assert gd.live_members() == ["B"]
    lease_b = gd.try_own(tp, "B")
    assert lease_b == ("B", 2)
    assert not gd.commit(tp, 42, "", lease_a)  # fenced
    assert gd.committed(tp) is None
    assert gd.commit(tp, 43, "", lease_b)
    assert gd.committed(tp) == 43
    gd.leave("A", fd_a)
    gd.leave("B", fd_b)


# -- hole 8: a failed message is never half-applied ------------------------------------------

class _Poisoned:
    """Counts events per batch in two keys; raises after the first write on a poison value."""

    name = "poisoned"
    input_topic = "in"
    changelog_topic = "cl"
    tables = SPECS

    def process(self, tables: dict[str, Any], record: Input) -> list[Output]:
        counts = tables["counts"]
        batch = record.value["batch_id"]
        counts.set(f"{batch}:a", (counts.get(f"{batch}:a") or 0) + 1)
        if record.value["kind"] == "failed":  # the poison
            raise RuntimeError("cannot fold this")
        counts.set(f"{batch}:b", (counts.get(f"{batch}:b") or 0) + 1)
        return []

    def on_error(self, record: Input, error: str) -> list[Output]:
        return [Output(EVENTS, "BatchEvent", {"batch_id": record.value["batch_id"],
                                              "kind": "failed", "at_ms": 0, "error": error},
                       key=record.value["batch_id"])]


def _event(batch: str, kind: str) -> bytes:
    return encode("BatchEvent", {"batch_id": batch, "kind": kind, "at_ms": 1})


def test_a_failed_message_is_checkpointed_half_applied_never(log: EmbeddedLog) -> None:
    producer = log.producer()
    for kind in ("submitted", "failed", "submitted"):
        producer.send("in", 0, _event("b", kind))
    producer.flush()
    task = ProcessorTask(log, _Poisoned(), OutputWriter(log, log.producer()), "p", "m1")
    for _ in range(50):
        task.step(timeout_s=0.01)
        if task.stores and task.stores[0].applied is not None and not task._uncommitted:
            break
    # the poison's first write was rolled back: a and b count the same two good messages
    assert task.tables("counts") == {"b:a": 2, "b:b": 2}
    task.close()
    assert restore(log, "cl", 0, SPECS)[0].data["counts"] == {"b:a": 2, "b:b": 2}
    (dead,) = [decode(m.value)[1] for m in log.read(DEAD_LETTER, 0)]
    assert dead["batch_id"] == "b" and "cannot fold this" in dead["reason"]
    failed = [decode(m.value)[1] for p in (0, 1) for m in log.read(EVENTS, p)]
    assert [e["kind"] for e in failed] == ["failed"]
    assert "RuntimeError: cannot fold this" in failed[0]["error"]


def test_store_rollback_restores_values_and_leaves_only_harmless_dirty_marks() -> None:
    store = PartitionStore(SPECS)
    view = store.views["counts"]
    view.set("kept", 1)
    store.begin()
    view.set("kept", 2)
    view.set("new", 3)
    view.delete("kept")
    store.rollback()
    assert store.data["counts"] == {"kept": 1}
    # what the next checkpoint writes is the state as it was: "new" deleted (it never was)
    assert dict(store.take_dirty()["counts"]) == {"kept": "1", "new": None}


# -- snapshots ---------------------------------------------------------------------------

def _snapshots(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(LocalObjectStore(tmp_path / "state"))


class _Counter:
    name = "counter"
    input_topic = "in"
    changelog_topic = "cl"
    tables = SPECS

    def process(self, tables: dict[str, Any], record: Input) -> list[Output]:
        counts = tables["counts"]
        key = record.value["batch_id"]
        counts.set(key, (counts.get(key) or 0) + 1)
        return []


def _run_until_applied(task: ProcessorTask, position: int) -> None:
    for _ in range(500):
        task.step(timeout_s=0.01)
        if task.stores and task.stores[0].applied == position and not task._uncommitted:
            return
    raise AssertionError(f"the task did not apply position {position}")


def test_restore_from_a_snapshot_and_the_changelog_tail_equals_the_full_restore(
        log: EmbeddedLog, tmp_path: Path) -> None:
    snapshots = _snapshots(tmp_path)
    producer = log.producer()
    for i in range(30):
        producer.send("in", 0, _event(f"b{i % 7}", "submitted"))
    producer.flush()
    last = list(log.read("in", 0))[-1].position
    task = ProcessorTask(log, _Counter(), OutputWriter(log, log.producer()), "p", "m1",
                         checkpoint_messages=4, snapshots=snapshots,
                         snapshot_policy=SnapshotPolicy(every_bytes=1, every_s=1e9))
    _run_until_applied(task, last)
    task.close()
    full = restore(log, "cl", 0, SPECS)[0]
    from_snapshot, tail = restore(log, "cl", 0, SPECS, snapshots)
    assert tail.first_schema == "snapshot"
    assert from_snapshot.data == full.data and from_snapshot.applied == full.applied == last
    assert sum(full.data["counts"].values()) == 30


def test_a_snapshot_covering_inputs_a_replay_rewinds_is_not_used(
        log: EmbeddedLog, tmp_path: Path) -> None:
    from streams.state.changelog import write_fence

    snapshots = _snapshots(tmp_path)
    producer = log.producer()
    store, tail = restore(log, "cl", 0, SPECS)
    claim(log, producer, "cl", 0, store, tail, "A")
    write_checkpoint(producer, "cl", 0, 10, store.generation, {"counts": [("k", "10")]})
    producer.flush()
    covers = list(log.read("cl", 0))[-1].position
    snapshots.save("cl", 0, Snapshot(covers, store.generation, 0, store.generation, 10,
                                     {"counts": [("k", "10")]}))
    write_fence(producer, "cl", 0, 5, epoch=1)  # replay from input 5
    producer.flush()
    restored, tail = restore(log, "cl", 0, SPECS, snapshots)
    assert restored.data["counts"] == {} and restored.applied is None
    assert tail.epoch == 1 and restored.epoch == 1


def test_a_damaged_snapshot_is_skipped(log: EmbeddedLog, tmp_path: Path) -> None:
    snapshots = _snapshots(tmp_path)
    producer = log.producer()
    write_claim(producer, "cl", 0, 1, "A")
    write_checkpoint(producer, "cl", 0, 3, 1, {"counts": [("k", "3")]})
    producer.flush()
    covers = list(log.read("cl", 0))[-1].position
    key = snapshots.save("cl", 0, Snapshot(covers, 1, 0, 1, 3, {"counts": [("k", "77")]}))
    path = tmp_path / "state" / key
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    restored, tail = restore(log, "cl", 0, SPECS, snapshots)
    assert restored.data["counts"] == {"k": 3} and tail.first_schema != "snapshot"


def test_a_changelog_whose_head_expired_without_a_snapshot_is_refused(
        log: EmbeddedLog) -> None:
    producer = log.producer()
    write_claim(producer, "cl", 0, 4, "D")  # the first retained message: generation 4
    write_checkpoint(producer, "cl", 0, 3, 4, {"counts": [("k", "3")]})
    producer.flush()
    with pytest.raises(HistoryLost, match="no snapshot covers"):
        restore(log, "cl", 0, SPECS)


def test_a_zombie_takes_no_snapshot_after_a_newer_claim(log: EmbeddedLog,
                                                         tmp_path: Path) -> None:
    snapshots = _snapshots(tmp_path)
    producer = log.producer()
    for i in range(6):
        producer.send("in", 0, _event(f"b{i}", "submitted"))
    producer.flush()
    positions = [m.position for m in log.read("in", 0)]
    zombie = ProcessorTask(log, _Counter(), OutputWriter(log, log.producer()), "p", "A",
                           checkpoint_messages=100, snapshots=snapshots,
                           snapshot_policy=SnapshotPolicy(every_bytes=1, every_s=1e9))
    zombie.consumer.poll(0, 0)  # joins and restores
    zombie._owned[0].store.views  # noqa: B018  (owned)
    # a newer owner claims meanwhile (A's lease expired)
    store, tail = restore(log, "cl", 0, SPECS)
    claim(log, producer, "cl", 0, store, tail, "B")
    _run_steps(zombie, 5)
    assert snapshots._keys("cl", 0) == []
    assert 0 not in zombie.stores  # it found out and dropped the partition
    entries = [decode(m.value)[1] for m in log.read("cl", 0) if schema_name(m.value) == ENTRY]
    assert entries and all(e["generation"] == 1 for e in entries)  # void: below the floor
    assert restore(log, "cl", 0, SPECS)[0].data["counts"] == {}
    assert positions  # the inputs were there to process
    zombie.close()


def _run_steps(task: ProcessorTask, n: int) -> None:
    for _ in range(n):
        task.step(timeout_s=0.01)


def test_read_checkpoints_reports_claims_fences_and_generations(log: EmbeddedLog) -> None:
    producer = log.producer()
    write_claim(producer, "cl", 0, 1, "A")
    write_checkpoint(producer, "cl", 0, 1, 1, {"counts": [("k", "1")]})
    write_claim(producer, "cl", 0, 2, "B")
    producer.flush()
    tail = Tail()
    assert [c.applied for c in read_checkpoints(log, "cl", 0, None, tail)] == [1]
    assert [(g, m) for _p, g, m in tail.claims] == [(1, "A"), (2, "B")]
    assert tail.floor == tail.generation == 2
    assert json.loads(json.dumps(tail.fences)) == []

"""The batch status fold (processors.pipeline_state): pure, no log."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.pipeline_state import BatchStatus, PipelineState, fold
from streams.api import Input
from streams.state.store import PartitionStore
from topics.spec import BATCH_STATUS

SINKS = ("s3", "warehouse")


def ev(kind: str, at: int, batch_id: str = "b1", **fields: Any) -> dict[str, Any]:
    return {"batch_id": batch_id, "kind": kind, "at_ms": at, **fields}


def submitted(at: int = 100, checksum: str = "c" * 64, sinks: tuple[str, ...] = SINKS,
              batch_id: str = "b1") -> dict[str, Any]:
    return ev("submitted", at, batch_id, source="in.csv", checksum=checksum, mode="add",
              sinks=list(sinks))


def published(at: int, counts: list[int], batch_id: str = "b1") -> dict[str, Any]:
    return ev("published", at, batch_id, rows=sum(counts), rejected=2, partition_counts=counts,
              segments=["seg-1", "seg-2"])


def applied(at: int, partition: int, changes: int = 10, batch_id: str = "b1") -> dict[str, Any]:
    return ev("partition_applied", at, batch_id, partition=partition, rows=changes + 1,
              changes=changes)


def committed(at: int, sink: str, partition: int, batch_id: str = "b1") -> dict[str, Any]:
    return ev("sink_committed", at, batch_id, partition=partition, sink=sink, changes=10,
              location=f"{sink}://out/{batch_id}")


def failed(at: int, step: str = "segments", error: str = "boom") -> dict[str, Any]:
    return ev("failed", at, step=step, error=error, partition=0)


def fold_all(events: list[dict[str, Any]], status: BatchStatus | None = None
             ) -> BatchStatus | None:
    for event in events:
        status = fold(status, event)
    return status


def lifecycle(partitions: int, sinks: tuple[str, ...], t0: int = 1_000) -> list[dict[str, Any]]:
    """The canonical event sequence of a batch that closes; times strictly increase."""
    t = iter(range(t0, t0 + 10_000, 7))
    events = [submitted(next(t), sinks=sinks),
              published(next(t), [5 + p for p in range(partitions)])]
    events += [applied(next(t), p, changes=p) for p in range(partitions)]
    events += [committed(next(t), sink, p) for sink in sinks for p in range(partitions)]
    return events


# ------------------------------------------------------------------- the status sequence


def test_status_sequence_to_closed() -> None:
    s = fold(None, submitted(100))
    assert s is not None
    assert (s.status, s.submitted_at, s.updated_at) == ("submitted", 100, 100)
    assert (s.source, s.mode, s.sinks) == ("in.csv", "add", SINKS)
    assert s.published_at is s.applied_at is s.closed_at is None

    s = fold(s, published(110, [4, 0, 6]))
    assert s is not None
    assert (s.status, s.published_at, s.updated_at) == ("published", 110, 110)
    assert (s.rows, s.rejected, s.partitions) == (10, 2, 3)
    assert s.partition_counts == (4, 0, 6) and s.segments == ("seg-1", "seg-2")

    for at, p in ((120, 2), (121, 0)):
        s = fold(s, applied(at, p, changes=p + 1))
        assert s is not None and s.status == "published" and s.applied_at is None
    s = fold(s, applied(130, 1, changes=5))
    assert s is not None
    assert s.applied_at == 130 and s.status == "published"
    assert s.applied == {"0": 1, "1": 5, "2": 3} and s.changes == 9

    at = 140
    for sink in SINKS:
        for p in (1, 0, 2):
            assert s is not None and s.status == "published" and s.closed_at is None
            s = fold(s, committed(at, sink, p))
            at += 1
    assert s is not None
    assert s.status == "closed" and s.finished
    assert s.closed_at == s.updated_at == at - 1  # the time of the completing event
    assert s.committed == {"s3": [0, 1, 2], "warehouse": [0, 1, 2]}
    assert s.locations == {"s3": "s3://out/b1", "warehouse": "warehouse://out/b1"}
    assert (s.submitted_at, s.published_at, s.applied_at) == (100, 110, 130)
    assert s.failed_at is None and s.error == ""


def test_closes_on_the_last_partition_applied_when_sinks_are_done_first() -> None:
    """A sink's commit may reach the events topic before the processor's partition_applied:
    the batch closes on whichever event completes it."""
    events = [submitted(1, sinks=("s3",)), published(2, [1, 1]), applied(3, 0),
              committed(4, "s3", 0), committed(5, "s3", 1)]
    s = fold_all(events)
    assert s is not None and s.status == "published"
    s = fold(s, applied(6, 1))
    assert s is not None
    assert (s.status, s.closed_at, s.applied_at) == ("closed", 6, 6)


def test_no_sinks_closes_when_every_partition_is_applied() -> None:
    s = fold_all([submitted(1, sinks=()), published(2, [3, 3]), applied(3, 1)])
    assert s is not None and s.status == "published"
    s = fold(s, applied(4, 0))
    assert s is not None and (s.status, s.closed_at) == ("closed", 4)


def test_event_before_submission_is_ignored() -> None:
    for event in (published(1, [1]), applied(2, 0), committed(3, "s3", 0), failed(4)):
        assert fold(None, event) is None


def test_unknown_kind_is_an_error() -> None:
    s = fold(None, submitted())
    with pytest.raises(ValueError, match="unknown batch event kind 'exploded'"):
        fold(s, ev("exploded", 200))


def test_second_submission_with_another_checksum_changes_nothing() -> None:
    first = fold(None, submitted(100, checksum="a" * 64))
    assert fold(first, submitted(200, checksum="b" * 64)) == first
    later = fold_all(lifecycle(2, SINKS)[1:3], first)
    assert later is not None
    again = fold(later, submitted(300, checksum="b" * 64, sinks=()))
    assert again == later and again.checksum == "a" * 64


# ------------------------------------------------------------------------------- failure


def test_failed_stops_the_batch() -> None:
    events = lifecycle(2, SINKS)
    s = fold_all(events[:3])  # submitted, published, one partition applied
    s = fold(s, failed(500, step="sink:s3", error="sink s3: partition 1 holds 3 but 4"))
    assert s is not None
    assert s.status == "failed" and s.finished
    assert (s.failed_at, s.updated_at) == (500, 500)
    assert s.failed_step == "sink:s3" and s.error == "sink s3: partition 1 holds 3 but 4"
    # Nothing after a failure changes it: not the rest of the lifecycle, not a resubmission,
    # not a second failure.
    after = fold_all([*events[3:], submitted(600), failed(700, error="other")], s)
    assert after == s


def test_import_failure_before_publishing() -> None:
    s = fold_all([submitted(1), failed(2, step="import", error="over the error budget")])
    assert s is not None
    assert (s.status, s.failed_step, s.published_at) == ("failed", "import", None)


def test_import_failure_keeps_rows_and_rejected() -> None:
    """The importer's `failed` event carries the rows read and the rows rejected: the status
    of a batch failed over its error budget should count them (DESIGN: bad rows are counted
    in the batch status). Decoded BatchEvents carry every field, defaults 0."""
    s = fold_all([submitted(1), failed(2, step="import", error="31 of 1000 rows rejected")
                  | {"rows": 969, "rejected": 31}])
    assert s is not None and s.status == "failed"
    assert (s.rows, s.rejected) == (969, 31)


def test_later_failure_keeps_the_published_counts() -> None:
    s = fold_all([*lifecycle(2, SINKS)[:2], failed(900) | {"rows": 0, "rejected": 0}])
    assert s is not None and s.status == "failed"
    assert (s.rows, s.rejected) == (11, 2)


def test_failed_after_closed_changes_nothing() -> None:
    closed = fold_all(lifecycle(1, SINKS))
    assert closed is not None and closed.status == "closed"
    assert fold(closed, failed(99_999)) == closed


# ------------------------------------------------------------------ properties of the fold


@st.composite
def lifecycle_with_duplicates(draw: st.DrawFn) -> tuple[list[dict[str, Any]],
                                                        list[dict[str, Any]]]:
    """(canonical events, the same with duplicates: each duplicate delivered at any point
    after the event it repeats, possibly re-sent later with a later time)."""
    partitions = draw(st.integers(1, 4))
    sinks = tuple(draw(st.lists(st.sampled_from(SINKS), unique=True)))
    canonical = lifecycle(partitions, sinks)
    if draw(st.booleans()):  # a batch that fails somewhere along the way
        at = draw(st.integers(1, len(canonical)))
        fail_time = canonical[at - 1]["at_ms"] + 1
        canonical = [*canonical[:at], failed(fail_time), *[
            {**e, "at_ms": e["at_ms"] + 2} for e in canonical[at:]]]
    noisy = list(canonical)
    for _ in range(draw(st.integers(0, 12))):
        i = draw(st.integers(0, len(noisy) - 1))
        j = draw(st.integers(i + 1, len(noisy)))
        dup = dict(noisy[i])
        if draw(st.booleans()):
            dup["at_ms"] += draw(st.integers(1, 10_000))  # re-sent after a crash
        noisy.insert(j, dup)
    return canonical, noisy


@settings(max_examples=300, deadline=None)
@given(lifecycle_with_duplicates())
def test_fold_is_idempotent_under_duplicates(events: tuple[list[dict[str, Any]],
                                                           list[dict[str, Any]]]) -> None:
    canonical, noisy = events
    # Each duplicate, wherever it lands, leaves the status exactly as it was.
    seen: list[dict[str, Any]] = []
    status: BatchStatus | None = None
    for event in noisy:
        before = status
        status = fold(status, event)
        same = {k: v for k, v in event.items() if k != "at_ms"}
        if any({k: v for k, v in e.items() if k != "at_ms"} == same for e in seen):
            assert status == before, f"duplicate {event} changed the status"
        seen.append(event)
    assert status == fold_all(canonical)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_close_time_is_the_completing_event_in_any_order(data: st.DataObject) -> None:
    """After `published`, applied and committed events may arrive in any order: the batch
    closes once, at the last one, with every partition applied and committed."""
    partitions = data.draw(st.integers(1, 4))
    sinks = tuple(data.draw(st.lists(st.sampled_from(SINKS), unique=True)))
    head, *tail = lifecycle(partitions, sinks)[1:]
    tail = data.draw(st.permutations(tail))
    tail = [{**e, "at_ms": 5_000 + i} for i, e in enumerate(tail)]
    status = fold_all([submitted(1, sinks=sinks), head])
    for i, event in enumerate(tail):
        assert status is not None and status.status == "published"
        status = fold(status, event)
        assert status is not None
        assert status.status == ("closed" if i == len(tail) - 1 else "published")
    assert status is not None
    last_applied = max(e["at_ms"] for e in tail if e["kind"] == "partition_applied")
    assert status.closed_at == tail[-1]["at_ms"] and status.applied_at == last_applied
    assert set(status.applied) == {str(p) for p in range(partitions)}
    assert status.committed == {sink: list(range(partitions)) for sink in sinks}


# ------------------------------------------------------------------------------- JSON


texts = st.text(max_size=20)
stamps = st.none() | st.integers(0, 2**53)


@given(st.builds(
    BatchStatus,
    batch_id=texts, status=st.sampled_from(["submitted", "published", "closed", "failed"]),
    source=texts, checksum=texts, mode=st.sampled_from(["add", "remove", "replace"]),
    sinks=st.lists(texts, max_size=3).map(tuple), segments=st.lists(texts, max_size=4).map(tuple),
    rows=st.integers(0, 2**53), rejected=st.integers(0, 2**53), partitions=st.integers(0, 64),
    partition_counts=st.lists(st.integers(0, 2**53), max_size=8).map(tuple),
    applied=st.dictionaries(st.integers(0, 63).map(str), st.integers(0, 2**53)),
    committed=st.dictionaries(texts, st.lists(st.integers(0, 63), max_size=4)),
    locations=st.dictionaries(texts, texts),
    submitted_at=stamps, published_at=stamps, applied_at=stamps, closed_at=stamps,
    failed_at=stamps, failed_step=texts, error=texts, updated_at=stamps))
def test_batch_status_json_round_trip(status: BatchStatus) -> None:
    text = status.to_json()
    again = BatchStatus.from_json(text)
    assert again == status
    assert again.to_json() == text  # deterministic bytes: a replay rewrites the same JSON
    assert isinstance(again.sinks, tuple) and isinstance(again.partition_counts, tuple)


def test_from_json_of_a_status_written_before_segments_existed() -> None:
    raw = json.loads(fold_all(lifecycle(1, SINKS)[:2]).to_json())  # type: ignore[union-attr]
    del raw["segments"]
    old = BatchStatus.from_json(json.dumps(raw))
    assert old.segments == () and old.status == "published"


# -------------------------------------------------------------------------- the processor


def run_processor(events: list[dict[str, Any]]
                  ) -> tuple[PartitionStore, list[tuple[int, list[Any]]]]:
    store = PartitionStore(PipelineState.tables)
    processor = PipelineState()
    outputs = []
    for position, event in enumerate(events):
        out = processor.process(store.views, Input("BatchEvent", event, 0, position,
                                                   event["at_ms"]))
        outputs.append((position, out))
    return store, outputs


@settings(max_examples=150, deadline=None)
@given(lifecycle_with_duplicates())
def test_processor_emits_a_snapshot_only_when_the_status_changes(
        events: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    _canonical, noisy = events
    store, outputs = run_processor(noisy)
    status: BatchStatus | None = None
    snapshots = []
    for (_position, out), event in zip(outputs, noisy, strict=True):
        after = fold(status, event)
        if after is None or after == status:
            assert out == []
        else:
            (snapshot,) = out
            assert snapshot.topic == BATCH_STATUS and snapshot.schema == "BatchStatus"
            assert snapshot.key == "b1" and snapshot.partition is None
            assert snapshot.value["batch_id"] == "b1"
            assert snapshot.value["status"] == after.status
            assert BatchStatus.from_json(snapshot.value["json"]) == after
            snapshots.append(after)
        status = after
    assert store.data["batches"]["b1"] == status
    assert len(snapshots) == len({s.to_json() for s in snapshots})  # each one new
    # Changelog round trip of the batch table.
    rebuilt = PartitionStore(PipelineState.tables)
    for table, entries in store.take_dirty().items():
        for key, encoded in entries:
            rebuilt.load(table, key, encoded)
    assert rebuilt.data == store.data


def test_processor_ignores_events_of_unsubmitted_batches_and_keeps_batches_apart() -> None:
    store, outputs = run_processor([
        published(1, [1], batch_id="ghost"),
        submitted(2, batch_id="b1"), submitted(3, batch_id="b2", sinks=()),
        published(4, [1], batch_id="b2"), applied(5, 0, batch_id="b2"),
        published(6, [2], batch_id="b1")])
    assert outputs[0] == (0, [])
    assert "ghost" not in store.data["batches"]
    assert store.data["batches"]["b2"].status == "closed"
    assert store.data["batches"]["b1"].status == "published"
    assert [len(out) for _p, out in outputs] == [0, 1, 1, 1, 1, 1]


def test_status_replace_is_not_mutated_by_fold() -> None:
    """The fold returns new values: a status held elsewhere (a snapshot) never changes."""
    s = fold(None, submitted())
    assert s is not None
    kept = replace(s)
    fold_all(lifecycle(2, SINKS)[1:], s)
    assert s == kept and s.applied == {} and s.committed == {}


def test_closed_at_is_when_the_last_sink_committed_not_its_input_time() -> None:
    """Regression: a sink stamps sink_committed with its input's (the end marker's) time,
    so closed_at came seconds before the last load finished. The event's own log time
    (after the commit) closes the batch."""
    store = PartitionStore(PipelineState.tables)
    processor = PipelineState()
    events = [submitted(100), published(200, [5]), applied(300, 0),
              committed(300, "s3", 0), committed(300, "warehouse", 0)]
    logged = [100, 200, 300, 4_000, 9_000]  # the loads took seconds after the end marker
    for position, (event, at) in enumerate(zip(events, logged, strict=True)):
        processor.process(store.views, Input("BatchEvent", event, 0, position, at))
    status = store.views["batches"].get("b1")
    assert status.status == "closed" and status.closed_at == 9_000


def test_submission_keeps_its_request() -> None:
    request = {"format": "csv", "delimiter": ",", "mode": "add", "segment": "vip"}
    status = fold(None, {**submitted(), "request": json.dumps(request)})
    assert status is not None and status.request == request
    assert BatchStatus.from_json(status.to_json()) == status
    assert fold(None, submitted()).request == {}  # older submissions carried none

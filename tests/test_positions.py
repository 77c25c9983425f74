"""Positions of any width where they are stored (topics/positions.py): the order-preserving
key, Avro stamps (and the values older writers wrote), object and snapshot names, and the
changelog, snapshot and restore path on a log whose positions are far above 2**64, as a
Kinesis log's are."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from connectors.object_store import LocalObjectStore
from connectors.s3_sink import object_name, parse_object_name
from streams.api import TableSpec
from streams.state.changelog import Tail, read_checkpoints, write_checkpoint, write_fence
from streams.state.recovery import claim, restore
from streams.state.snapshots import Snapshot, SnapshotStore
from streams.state.store import PartitionStore
from tests.test_codec import single_object_header
from topics import positions
from topics.backends.embedded.log import EmbeddedLog
from topics.codec import _load_dir, decode, encode
from topics.columns import write_columns
from topics.log import Message
from topics.positions import from_key, key, stored
from topics.spec import TopicSpec

# Boundaries: int64, the 20-digit names, a Kinesis sequence number's 129 digits.
EDGES = [0, 1, 2**63 - 1, 2**63, 2**64, 10**20 - 1, 10**20, 10**21, 2**130, 10**128,
         10**129 - 1, 10**129, 2**600]
any_position = st.one_of(st.just(-1), st.sampled_from(EDGES),
                         st.integers(0, 10**21), st.integers(0, 2**700))


# -- the key ---------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(a=any_position, b=any_position)
@example(a=10**20 - 1, b=10**20)
@example(a=-1, b=0)
@example(a=10**99, b=10**100)  # the digit count's own width grows
def test_keys_sort_as_the_positions_do_at_any_width(a: int, b: int) -> None:
    assert (key(a) < key(b)) == (a < b)
    assert (key(a) == key(b)) == (a == b)
    # Bytewise too (how warehouses and DynamoDB compare), and under a locale-like order
    # that ignores punctuation: a key holds only digits and `w`.
    assert (key(a).encode() < key(b).encode()) == (a < b)
    assert set(key(a)) <= set("0123456789w")


@settings(max_examples=300, deadline=None)
@given(p=any_position)
def test_keys_round_trip(p: int) -> None:
    assert from_key(key(p)) == p
    assert stored(key(p)) == p and stored(key(p).encode()) == p
    assert stored(p) == p  # an int64 column or an Avro long of an older writer


@given(p=st.integers(0, 10**20 - 1))
def test_narrow_keys_are_the_old_twenty_digits(p: int) -> None:
    assert key(p) == f"{p:020d}"


def test_wide_and_sentinel_keys() -> None:
    assert key(10**20) == "w221" + "1" + "0" * 20
    assert key(-1) == "" and from_key("") == -1
    with pytest.raises(ValueError, match="-1 or above"):
        key(-2)
    # Each position has one key: no leading zeros, no narrow number in the wide form.
    for bad in ["0", "123", "w", "w2", "w221" + "0" * 21, "w220" + "1" * 20,
                "w3021" + "1" * 21, "w2201" + "0" * 19, "x" * 20, "-1",
                "0000000000000000000a", "\u0661" * 20, " " + "0" * 19]:
        with pytest.raises(ValueError, match="not a position key"):
            from_key(bad)


# -- Avro stamps -------------------------------------------------------------------------------

# A value of each schema that holds positions, and its position fields.
STAMPED: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "SegmentChanges": ({"batch_id": "b", **write_columns([1], ["u"], ["s"], ["add"])},
                       ("source_position",)),
    "EndMarker": ({"batch_id": "b", "partition": 3, "count": 2, "total": 9, "mode": "add",
                   "segments": ["s"]}, ("source_position",)),
    "BatchStatus": ({"batch_id": "b", "status": "closed", "json": "{}"}, ("source_position",)),
    "Changelog": ({"table": "members"}, ("input_position", "previous")),
    "ChangelogFence": ({"epoch": 2}, ("from_position",)),
    "ReplayFence": ({"epoch": 2}, ("from_position",)),
}
HISTORY = {"SegmentChanges": "SegmentChanges.v5", "EndMarker": "EndMarker.v2",
           "BatchStatus": "BatchStatus.v1", "Changelog": "Changelog.v3",
           "ChangelogFence": "ChangelogFence.v2", "ReplayFence": "ReplayFence.v1"}


@pytest.mark.parametrize("schema", sorted(STAMPED))
@pytest.mark.parametrize("position", [-2, -1, 0, 2**63 - 1, 2**63, 2**130 + 7,
                                      10**128 * 3 + 5, 2**700])
def test_avro_stamps_hold_positions_of_any_width(schema: str, position: int) -> None:
    base, fields = STAMPED[schema]
    value = {**base, **dict.fromkeys(fields, position)}
    name, decoded = decode(encode(schema, value))
    assert name == schema
    assert {f: decoded[f] for f in fields} == dict.fromkeys(fields, position)
    assert all(type(decoded[f]) is int for f in fields)


def test_every_position_field_of_the_current_schemas_is_of_any_width() -> None:
    fields = {(raw["name"], f["name"]) for raw in _load_dir("schemas") for f in raw["fields"]
              if f["name"].endswith("_position") or (raw["name"], f["name"]) == (
                  "Changelog", "previous")}
    assert fields == {(s, f) for s, (_v, names) in STAMPED.items() for f in names}
    for raw in _load_dir("schemas"):
        for f in raw["fields"]:
            if (raw["name"], f["name"]) in fields:
                assert f["type"] == positions.AVRO_TYPE, (raw["name"], f["name"])


def test_a_narrow_stamp_is_still_a_long() -> None:
    """The long branch comes first: a narrow value is the old long plus one union byte."""
    small, wide = (encode("ReplayFence", {"from_position": p, "epoch": 0})
                   for p in (5, 2**64))
    assert small.endswith(b"\x00\x0a\x00")  # branch 0, zigzag 5, epoch 0
    assert b"18446744073709551616" in wide  # branch 1: the decimal digits


def _history(name: str) -> dict[str, Any]:
    path = f"schemas/history/{name}.avsc"
    return json.loads(resources.files("topics").joinpath(path).read_text(encoding="utf-8"))


@pytest.mark.parametrize("schema", sorted(STAMPED))
def test_values_written_before_wide_positions_stay_readable(schema: str) -> None:
    """An old writer's longs resolve to the union's long branch."""
    old = fastavro.parse_schema(_history(HISTORY[schema]))
    assert all(f["type"] == "long" for f in old["fields"] if f["name"] in STAMPED[schema][1])
    base, fields = STAMPED[schema]
    value = {**base, **{f: 1234 + i for i, f in enumerate(fields)}}
    if schema == "Changelog":
        value["previous"] = -1
    buf = io.BytesIO()
    buf.write(single_object_header(_history(HISTORY[schema])))
    fastavro.schemaless_writer(buf, old, value)
    _name, decoded = decode(buf.getvalue())
    assert {f: decoded[f] for f in fields} == {f: value[f] for f in fields}


# -- names -------------------------------------------------------------------------------------

def test_object_names_keep_the_old_form_below_ten_to_the_twenty() -> None:
    assert object_name(1200, 3, "parquet") == "part-00000000000000001200-00003.parquet"
    assert object_name(10**20 - 1, 0, "jsonl") == f"part-{10**20 - 1:020d}-00000.jsonl"
    assert parse_object_name("x/y/part-00000000000000001200-00003.parquet") == (1200, 3)


@settings(max_examples=200, deadline=None)
@given(stamps=st.lists(st.tuples(st.integers(0, 2**600), st.integers(0, 99_999)),
                       min_size=1, max_size=12, unique=True))
def test_object_names_sort_in_log_order_and_parse_back(stamps: list[tuple[int, int]]) -> None:
    names = {object_name(p, part, "avro"): (p, part) for p, part in stamps}
    assert [names[n] for n in sorted(names)] == sorted(stamps)
    assert all(parse_object_name(n) == stamp for n, stamp in names.items())


# -- the changelog, snapshots and restore on wide positions -----------------------------------

SHIFT = 10**128 * 7  # a log whose positions look like Kinesis sequence numbers, and wider
MEMBERS = TableSpec("members", encode=json.dumps, decode=json.loads)
SPECS = (MEMBERS,)


class WideLog:
    """An EmbeddedLog whose positions are all SHIFT higher (the Log interface's positions
    are opaque ints; this one's are 129 digits, as on Kinesis)."""

    def __init__(self, inner: EmbeddedLog):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, topic: str, partition: int, after: int | None = None) -> Iterator[Message]:
        for msg in self.inner.read(topic, partition, None if after is None else after - SHIFT):
            yield dataclasses.replace(msg, position=msg.position + SHIFT)

    def read_at(self, topic: str, partition: int, position: int) -> Message:
        msg = self.inner.read_at(topic, partition, position - SHIFT)
        return dataclasses.replace(msg, position=msg.position + SHIFT)


@pytest.fixture
def wide_log(tmp_path: Path) -> Iterator[WideLog]:
    inner = EmbeddedLog(tmp_path / "data")
    inner.ensure_topics([TopicSpec("cl", 1, ("Changelog",), changelog=True)])
    yield WideLog(inner)
    inner.close()


IN = 10**130  # input positions: wide too


def test_changelog_restore_and_fences_on_wide_positions(wide_log: WideLog) -> None:
    log = wide_log
    producer = log.producer()
    store, tail = restore(log, "cl", 0, SPECS)  # type: ignore[arg-type]
    claim(log, producer, "cl", 0, store, tail, "m1")  # type: ignore[arg-type]
    g = store.generation
    write_checkpoint(producer, "cl", 0, IN + 1, g, {"members": [("u1", '["s"]')]},
                     previous=None)
    write_checkpoint(producer, "cl", 0, IN + 10**20, g, {"members": [("u2", '["s"]')]},
                     previous=IN + 1)
    write_checkpoint(producer, "cl", 0, IN * 10, g, {"members": [("u3", '["s"]')]},
                     previous=IN + 10**20)
    producer.flush()
    restored, tail = restore(log, "cl", 0, SPECS)  # type: ignore[arg-type]
    assert restored.applied == IN * 10
    assert restored.data["members"] == {"u1": ["s"], "u2": ["s"], "u3": ["s"]}
    assert tail.last_position is not None and tail.last_position > SHIFT

    # A replay from IN + 10**20 voids the two checkpoints at or after it, compared as
    # numbers (as decimal text IN * 10 would sort below IN + 10**20 and survive).
    write_fence(producer, "cl", 0, IN + 10**20, epoch=1)
    producer.flush()
    rewound, tail = restore(log, "cl", 0, SPECS)  # type: ignore[arg-type]
    assert rewound.applied == IN + 1 and rewound.epoch == 1
    assert rewound.data["members"] == {"u1": ["s"]}
    assert [(f, e) for _p, f, e in tail.fences] == [(IN + 10**20, 1)]
    assert [c.applied for c in read_checkpoints(log, "cl", 0, None, Tail())] == [IN + 1]


def test_snapshots_of_wide_positions_are_named_sorted_and_restored(
        wide_log: WideLog, tmp_path: Path) -> None:
    log = wide_log
    producer = log.producer()
    store, tail = restore(log, "cl", 0, SPECS)  # type: ignore[arg-type]
    claim(log, producer, "cl", 0, store, tail, "m1")  # type: ignore[arg-type]
    write_checkpoint(producer, "cl", 0, IN + 1, store.generation,
                     {"members": [("u1", '["s"]')]}, previous=None)
    producer.flush()
    restored, tail = restore(log, "cl", 0, SPECS)  # type: ignore[arg-type]
    covers = tail.last_position
    assert covers is not None and covers > 10**128
    snapshots = SnapshotStore(LocalObjectStore(tmp_path / "s3"))
    # An older snapshot under the old name form (a narrow position: the same bytes as
    # before wide positions), and the new one under a wide key.
    old = snapshots.save("cl", 0, Snapshot(5, 1, 0, 1, 3, {"members": [("u0", '["s"]')]}))
    assert old == "_state/cl/0/snapshot-00000000000000000005-1.snap"
    name = snapshots.save("cl", 0, Snapshot(covers, store.generation, 0, store.generation,
                                            IN + 1, restored.snapshot_entries()))
    assert name == f"_state/cl/0/snapshot-{key(covers)}-{store.generation}.snap"
    assert name.split("/")[-1].startswith("snapshot-w3129")
    assert [s.covers for s in snapshots.candidates("cl", 0)] == [covers, 5]

    # After the snapshot, one more checkpoint: a restore takes the snapshot, then the tail.
    write_checkpoint(producer, "cl", 0, IN + 2, store.generation,
                     {"members": [("u2", '["t"]')]}, previous=IN + 1)
    producer.flush()
    again, tail = restore(log, "cl", 0, SPECS, snapshots)  # type: ignore[arg-type]
    assert tail.first_schema == "snapshot"
    assert again.applied == IN + 2 and again.checkpointed == IN + 2
    assert again.data["members"] == {"u1": ["s"], "u2": ["t"]}
    assert positions.from_key(name.split("-")[1]) == covers


def test_a_store_made_of_wide_stamps_round_trips_through_the_snapshot_header(
        tmp_path: Path) -> None:
    snapshots = SnapshotStore(LocalObjectStore(tmp_path))
    snap = Snapshot(2**400, 3, 2, 3, 10**129 - 1, {"members": [("u", '["s"]')]})
    snapshots.save("cl", 1, snap)
    assert list(snapshots.candidates("cl", 1)) == [snap]
    assert PartitionStore(SPECS).applied is None

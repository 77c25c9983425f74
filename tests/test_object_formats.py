"""ChangeSet and its object encodings: deterministic bytes, round trips, the manifest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastavro
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.change_set import ARROW_SCHEMA, ChangeSet, record_batch
from connectors.object_formats import (
    FIELDS,
    FORMATS,
    ManifestEntry,
    avro_sync_marker,
    decode_changes,
    encode_changes,
    encode_manifest,
    extension,
)
from topics.codec import decode, encode
from topics.columns import write_columns
from topics.positions import key

REPO = Path(__file__).resolve().parent.parent

# Ids that trip naive encoders: quotes, backslash, newline, non-ASCII, U+2028 (a line
# break to str.splitlines but not to JSON), emoji. Rows of three messages: the tail of a
# replace end marker's part 2 (at 1200), a rows message (1250), an end marker's part 0.
CHANGES = ChangeSet.from_lists(
    batch_id="batch-é-1",
    partition=3,
    first_position=1200,
    first_part=2,
    user_ids=["u1", 'u"2', "u\\3", "u\n4", "ü5", "u\u20286", "😀7"],
    segment_ids=["s1", "s1", "s2", "s2", "s3", "s3", "s1"],
    ops=["remove", "remove", "remove", "add", "add", "remove", "remove"],
    seqs=[-1, -1, 12, 13, 14, -1, -1],
    source_positions=[1200, 1200, 1250, 1250, 1250, 2**62, 2**130],  # 2**130: a wide one
    parts=[2, 2, 0, 0, 0, 0, 0],
)


def _expected_rows(cs: ChangeSet) -> list[dict[str, object]]:
    return [
        {
            "batch_id": cs.batch_id,
            "partition": cs.partition,
            "user_id": u,
            "segment_id": s,
            "op": o,
            "seq": q,
            "source_position": key(sp),  # objects hold the position's key
            "part": part,
        }
        for u, s, o, q, sp, part in zip(cs.user_ids, cs.segment_ids, cs.ops, cs.seqs,
                                        cs.source_positions, cs.parts, strict=True)
    ]


# -- ChangeSet ---------------------------------------------------------------------------


def test_change_set_to_arrow() -> None:
    table = CHANGES.to_arrow()
    assert len(CHANGES) == 7
    assert table.schema == ARROW_SCHEMA
    assert table.to_pylist() == _expected_rows(CHANGES)


def test_change_set_rejects_misaligned_columns_and_unknown_ops() -> None:
    with pytest.raises(ValueError, match="column lengths differ"):
        ChangeSet.from_lists("b", 0, 0, ["u1", "u2"], ["s1"], ["add"], [1])
    with pytest.raises(ValueError, match="column lengths differ"):
        ChangeSet.from_lists("b", 0, 0, ["u1"], ["s1"], ["add"], [1], parts=[0, 1])
    with pytest.raises(ValueError, match=r"unknown ops \['replace'\]"):
        ChangeSet.from_lists("b", 0, 0, ["u1"], ["s1"], ["replace"], [1])


def test_change_set_is_named_by_the_stamp_of_its_first_change() -> None:
    """(first_position, first_part) name the chunk; they must be its first row's stamp."""
    ok = ChangeSet.from_lists("b", 0, 7, ["u1", "u2"], ["s", "s"], ["remove"] * 2, [-1, -1],
                              first_part=3, parts=[3, 4])
    assert (ok.first_position, ok.first_part, ok.source_positions, ok.parts) == (
        7, 3, [7, 7], [3, 4])
    with pytest.raises(ValueError, match=r"b/0@7.2: its first change is stamped \(7, 3\)"):
        ChangeSet.from_lists("b", 0, 7, ["u1"], ["s"], ["add"], [1], first_part=2, parts=[3])


@pytest.mark.parametrize("segments", [3, 300])  # 1-byte and 2-byte dictionary indexes
def test_record_batch_reads_packed_segment_changes(segments: int) -> None:
    users = [f"user-{i}" for i in range(1000)]
    segs = [f"seg-{i % segments}" for i in range(1000)]
    ops = ["add" if i % 3 else "remove" for i in range(1000)]
    seqs = [i * 7 - 1 for i in range(1000)]
    value = {"batch_id": "b", "source_position": 5, "part": 2,
             **write_columns(seqs, users, segs, ops)}
    _name, decoded = decode(encode("SegmentChanges", value))
    expected = ChangeSet.from_lists("b", 0, 5, users, segs, ops, seqs, first_part=2)
    assert record_batch(decoded).to_pylist() == expected.columns.to_pylist()


def test_record_batch_reads_an_older_writers_arrays() -> None:
    value = {"count": 0, "user_ids": ["u1", "u2"], "segment_ids": ["s", "t"],
             "ops": ["add", "remove"], "seqs": [3, -1], "source_position": 9, "part": 1}
    assert record_batch(value).to_pylist() == [
        {"user_id": "u1", "segment_id": "s", "op": "add", "seq": 3,
         "source_position": "00000000000000000009", "part": 1},
        {"user_id": "u2", "segment_id": "t", "op": "remove", "seq": -1,
         "source_position": "00000000000000000009", "part": 1}]


def test_record_batch_refuses_columns_of_the_wrong_size() -> None:
    value = write_columns([1, 2], ["u1", "u2"], ["s", "s"], ["add", "add"])
    with pytest.raises(ValueError, match="of 2 rows holds 2 user ids and 1 row numbers"):
        record_batch({**value, "seq_column": value["seq_column"][:8]})
    with pytest.raises(ValueError, match="dictionary column of 1 bytes for 2 rows"):
        record_batch({**value, "op_dictionary": {"values": ["add"], "index": b"\0"}})


# -- encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_encoding_is_byte_identical_and_round_trips(fmt: str) -> None:
    data = encode_changes(CHANGES, fmt)
    assert encode_changes(CHANGES, fmt) == data
    rebuilt = ChangeSet.from_lists(**{**_fields(CHANGES), "user_ids": list(CHANGES.user_ids)})
    assert encode_changes(rebuilt, fmt) == data  # equal content, distinct objects
    assert decode_changes(data, fmt) == _expected_rows(CHANGES)


def _fields(cs: ChangeSet) -> dict[str, Any]:
    """The arguments of ChangeSet.from_lists that make `cs` again."""
    return {"batch_id": cs.batch_id, "partition": cs.partition,
            "first_position": cs.first_position, "first_part": cs.first_part,
            "user_ids": cs.user_ids, "segment_ids": cs.segment_ids, "ops": cs.ops,
            "seqs": cs.seqs, "source_positions": cs.source_positions, "parts": cs.parts}


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_change_set(fmt: str) -> None:
    empty = ChangeSet.from_lists("b", 0, 0, [], [], [], [])
    data = encode_changes(empty, fmt)
    assert data == encode_changes(empty, fmt)
    assert decode_changes(data, fmt) == []


def test_same_bytes_in_another_process() -> None:
    # A different hash seed must not change anything (no set/dict-order dependence).
    script = (
        "import sys, json\n"
        "from connectors.change_set import ChangeSet\n"
        "from connectors.object_formats import encode_changes, FORMATS\n"
        "cs = ChangeSet.from_lists(**json.loads(sys.stdin.read()))\n"
        "sys.stdout.write(json.dumps({f: encode_changes(cs, f).hex() for f in FORMATS}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(_fields(CHANGES)),
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)},
    ).stdout
    assert {f: bytes.fromhex(h) for f, h in json.loads(out).items()} == {
        f: encode_changes(CHANGES, f) for f in FORMATS
    }


def test_avro_is_a_standard_container_file() -> None:
    data = encode_changes(CHANGES, "avro")
    reader = fastavro.reader(io.BytesIO(data))
    assert reader.writer_schema["name"] == "audience.connectors.SegmentChange"
    assert [f["name"] for f in reader.writer_schema["fields"]] == list(FIELDS)
    assert reader.metadata["avro.codec"] == "deflate"
    assert list(reader) == _expected_rows(CHANGES)
    # The sync marker is the chunk's fixed one (it ends the file, after the last block).
    assert data.endswith(avro_sync_marker(CHANGES))


def test_avro_sync_marker_depends_on_chunk_identity() -> None:
    fields = _fields(CHANGES)
    moved = ChangeSet.from_lists(**{**fields, "first_position": 1201,
                                    "source_positions": [1201, *fields["source_positions"][1:]]})
    next_part = ChangeSet.from_lists(**{**fields, "first_part": 3,
                                        "parts": [3, *fields["parts"][1:]]})
    markers = {avro_sync_marker(cs) for cs in (CHANGES, moved, next_part)}
    assert len(markers) == 3 and {len(m) for m in markers} == {16}
    for other in (moved, next_part):
        assert encode_changes(other, "avro") != encode_changes(CHANGES, "avro")
        assert decode_changes(encode_changes(other, "avro"), "avro") == _expected_rows(other)


def test_parquet_is_readable_by_pyarrow() -> None:
    data = encode_changes(CHANGES, "parquet")
    table = pq.read_table(io.BytesIO(data))
    assert table.schema.remove_metadata() == ARROW_SCHEMA
    assert table.to_pylist() == _expected_rows(CHANGES)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert meta.row_group(0).column(0).compression == "SNAPPY"


def test_jsonl_lines_are_compact_ordered_utf8_json() -> None:
    data = encode_changes(CHANGES, "jsonl")
    assert data.endswith(b"\n")
    lines = data.decode("utf-8").split("\n")[:-1]
    assert len(lines) == len(CHANGES)
    for line, row in zip(lines, _expected_rows(CHANGES), strict=True):
        assert line == json.dumps(row, ensure_ascii=False, separators=(",", ":"))
    assert "ü5".encode() in data  # UTF-8, not \u escapes
    assert list(json.loads(lines[0])) == list(FIELDS)


def test_unknown_format_and_extensions() -> None:
    assert [extension(f) for f in FORMATS] == [".avro", ".jsonl", ".parquet"]
    for call in (
        lambda: encode_changes(CHANGES, "csv"),
        lambda: decode_changes(b"", "csv"),
        lambda: extension("csv"),
    ):
        with pytest.raises(ValueError, match="unknown object format 'csv'"):
            call()


ids = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def change_sets(draw: st.DrawFn) -> ChangeSet:
    n = draw(st.integers(0, 30))
    first_position, first_part = draw(st.integers(0, 2**200)), draw(st.integers(0, 99_999))
    positions = draw(st.lists(st.integers(0, 2**200), min_size=n, max_size=n))
    parts = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    return ChangeSet.from_lists(
        batch_id=draw(ids),
        partition=draw(st.integers(0, 2**31 - 1)),
        first_position=first_position,
        first_part=first_part,
        user_ids=draw(st.lists(ids, min_size=n, max_size=n)),
        segment_ids=draw(st.lists(ids, min_size=n, max_size=n)),
        ops=draw(st.lists(st.sampled_from(["add", "remove"]), min_size=n, max_size=n)),
        seqs=draw(st.lists(st.integers(-1, 2**62), min_size=n, max_size=n)),
        source_positions=[first_position, *positions[1:]][:n],
        parts=[first_part, *parts[1:]][:n],
    )


@settings(max_examples=60, deadline=None)
@given(cs=change_sets())
def test_any_change_set_round_trips_deterministically(cs: ChangeSet) -> None:
    for fmt in FORMATS:
        data = encode_changes(cs, fmt)
        assert encode_changes(cs, fmt) == data
        assert decode_changes(data, fmt) == _expected_rows(cs)


# -- manifest ----------------------------------------------------------------------------


def test_manifest_is_redshift_copy_shaped_and_sorted() -> None:
    entries = [
        ManifestEntry("s3://bkt/b1/p1/000.parquet", content_length=300, record_count=7),
        ManifestEntry("s3://bkt/b1/p0/050.parquet", content_length=200, record_count=5),
        ManifestEntry("s3://bkt/b1/p0/000.parquet", content_length=100, record_count=3),
    ]
    data = encode_manifest(entries, batch_id="b1", fmt="parquet")
    assert encode_manifest(list(reversed(entries)), batch_id="b1", fmt="parquet") == data
    assert json.loads(data) == {
        "batch_id": "b1",
        "format": "parquet",
        "record_count": 15,
        "entries": [
            {
                "url": "s3://bkt/b1/p0/000.parquet",
                "mandatory": True,
                "meta": {"content_length": 100, "record_count": 3},
            },
            {
                "url": "s3://bkt/b1/p0/050.parquet",
                "mandatory": True,
                "meta": {"content_length": 200, "record_count": 5},
            },
            {
                "url": "s3://bkt/b1/p1/000.parquet",
                "mandatory": True,
                "meta": {"content_length": 300, "record_count": 7},
            },
        ],
    }
    text = data.decode()
    assert text.index('"batch_id"') < text.index('"entries"') < text.index('"format"')


def test_manifest_of_no_objects_and_bad_input() -> None:
    empty = json.loads(encode_manifest([], batch_id="b2", fmt="avro"))
    assert empty == {"batch_id": "b2", "format": "avro", "record_count": 0, "entries": []}
    dup = [ManifestEntry("file:///x/a.avro", 1, 1)] * 2
    with pytest.raises(ValueError, match="lists an object twice"):
        encode_manifest(dup, batch_id="b2", fmt="avro")
    with pytest.raises(ValueError, match="unknown object format"):
        encode_manifest([], batch_id="b2", fmt="csv")


# -- attributes -------------------------------------------------------------------------


def test_attributes_of_messages_combine_with_nulls_and_widened_types() -> None:
    import pyarrow as pa

    from connectors.change_set import combine_attributes

    first = pa.table({"plan": ["a", "b"], "n": pa.array([1, 2], pa.int64())})
    second = pa.table({"n": [0.5], "extra": [["x"]]})  # n a float here, a nested column
    third = pa.table({"plan": pa.array([3], pa.int64())})  # plan a number: text
    combined = combine_attributes([(2, first), (1, None), (1, second), (1, third)])
    assert combined is not None
    assert combined.schema.names == ["plan", "n", "extra"]
    assert combined.schema.field("n").type == pa.float64()
    assert combined.schema.field("plan").type == pa.string()
    assert combined.to_pylist() == [
        {"plan": "a", "n": 1.0, "extra": None}, {"plan": "b", "n": 2.0, "extra": None},
        {"plan": None, "n": None, "extra": None},  # a replace's removals: nulls
        {"plan": None, "n": 0.5, "extra": ["x"]}, {"plan": "3", "n": None, "extra": None}]
    assert combine_attributes([(3, None)]) is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_attributes_are_columns_of_every_format(fmt: str) -> None:
    import pyarrow as pa

    attrs = pa.table({"country": ["DE", None], "score": pa.array([7, None], pa.int64()),
                      "ok": [True, False], "seq": ["shadowed", "x"], "tags": [["a"], None]})
    changes = ChangeSet.from_lists("b", 1, 5, ["u1", "u2"], ["s", "s"], ["add", "remove"],
                                   [1, -1], attributes=attrs)
    rows = decode_changes(encode_changes(changes, fmt), fmt)
    assert [r["seq"] for r in rows] == [1, -1]  # the change's own seq is not shadowed
    assert [r["attr_seq"] for r in rows] == ["shadowed", "x"]
    assert [(r["country"], r["score"], r["ok"]) for r in rows] == [("DE", 7, True),
                                                                   (None, None, False)]
    tags = [r["tags"] for r in rows]
    assert tags == ([["a"], None] if fmt == "parquet" else ['["a"]', None])
    # deterministic: same change set, same bytes
    assert encode_changes(changes, fmt) == encode_changes(changes, fmt)


def test_attributes_follow_the_changes_through_the_segments_processor() -> None:
    """Only rows that change a membership become changes, each with its own attributes;
    a replace's removals at the end marker have none."""
    import pyarrow as pa

    from connectors.change_set import record_attributes
    from processors.segments import AudienceSegments
    from streams.api import Input
    from streams.state.store import PartitionStore
    from topics import attributes

    processor, store = AudienceSegments(), PartitionStore(AudienceSegments.tables)
    old = {"batch_id": "b0", "mode": "add", **write_columns([1], ["u9"], ["s"], ["add"])}
    processor.process(store.views, Input("AudienceRows", old, 0, 1, 0))
    processor.process(store.views, Input("EndMarker", {
        "batch_id": "b0", "partition": 0, "count": 1, "total": 1, "mode": "add",
        "segments": ["s"], "source_position": -1}, 0, 2, 0))
    rows = {"batch_id": "b1", "mode": "replace",
            **write_columns([1, 2, 3], ["u1", "u1", "u2"], ["s", "s", "s"],
                            ["add", "add", "add"]),
            attributes.FIELD: attributes.pack(pa.table({"plan": ["a", "dup", "c"]}))}
    (out,) = processor.process(store.views, Input("AudienceRows", rows, 0, 3, 0))
    assert out.value["count"] == 2  # u1's second add changes nothing
    assert record_attributes(out.value, 2).to_pylist() == [{"plan": "a"}, {"plan": "c"}]
    outs = processor.process(store.views, Input("EndMarker", {
        "batch_id": "b1", "partition": 0, "count": 3, "total": 3, "mode": "replace",
        "segments": ["s"], "source_position": -1}, 0, 4, 0))
    (removal,) = [o for o in outs if o.schema == "SegmentChanges"]
    assert removal.value["user_id_column"] == "u9"
    assert record_attributes(removal.value, 1) is None
    decode(encode("SegmentChanges", removal.value))  # the value is what the schema holds

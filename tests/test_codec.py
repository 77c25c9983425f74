"""Avro single-object encoding (topics/codec.py) and Kafka's partitioner (topics/partitioner.py),
checked against independent implementations: the Avro spec's CRC-64-AVRO and kafka-python."""

from __future__ import annotations

import io
import json
import struct
from importlib import resources
from typing import Any

import fastavro
import pyarrow as pa
import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2 as kafka_murmur2

from topics import attributes, codec
from topics.codec import REGISTRY, SchemaError, SchemaRegistry, decode, encode
from topics.columns import read_columns, write_columns
from topics.partitioner import murmur2, partition_for

# -- CRC-64-AVRO, straight from the Avro specification ("Schema Fingerprints") ------------

_EMPTY = 0xC15D213AA4D7A795


def _table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp & 0xFFFFFFFFFFFFFFFF)
    return table


_TABLE = _table()


def crc64_avro(data: bytes) -> int:
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def single_object_header(schema: Any) -> bytes:
    """C3 01, then the schema's CRC-64-AVRO fingerprint, little-endian (the spec's layout)."""
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schema))
    return b"\xc3\x01" + struct.pack("<Q", crc64_avro(canonical.encode("utf-8")))


def _load(path: str) -> dict[str, Any]:
    text = resources.files("topics").joinpath(path).read_text(encoding="utf-8")
    return json.loads(text)


def test_independent_crc64_matches_the_spec_value_for_long() -> None:
    assert crc64_avro(b'"long"') == 0xD054E14493F41DB7
    assert single_object_header("long") == bytes.fromhex("c301b71df49344e154d0")


def test_magic_and_header_size() -> None:
    assert codec.MAGIC == b"\xc3\x01"
    assert codec.HEADER_SIZE == 10


# -- every schema round trips -------------------------------------------------------------

_NO_DICT = {"values": [], "index": []}
_LEGACY_EMPTY = {"seqs": [], "user_ids": [], "segment_ids": [], "ops": [],
                 "segment_column": _NO_DICT, "op_column": _NO_DICT}

SAMPLES: dict[str, dict[str, Any]] = {
    "AudienceRows": {
        "batch_id": "b-1", "mode": "replace",
        **write_columns([1, 2, 2**40], ["u1", "u2", "ü-3"], ["s1", "s1", "s2"],
                        ["add", "remove", "add"]),
        **_LEGACY_EMPTY,
        "attributes": [{"k": "v"}, {}, {"x": "y", "z": ""}],
        "attribute_columns": attributes.pack(pa.table({"plan": ["a", None, "b"],
                                                       "n": [1, 2, None]})),
    },
    "BatchEvent": {
        "batch_id": "b-1", "kind": "published", "at_ms": 1_700_000_000_000, "source": "s3://b/k",
        "checksum": "abc", "mode": "add", "partition": 3, "sink": "s3", "sinks": ["s3", "wh"],
        "segments": ["s1"], "rows": 10, "rejected": 1, "partition_counts": [4, 3, 2, 1],
        "changes": 7, "step": "import", "error": "", "location": "x", "request": "{}",
    },
    "BatchStatus": {"batch_id": "b-1", "status": "closed", "json": '{"a": 1}',
                    "source_position": 42},
    "ChangelogFence": {"from_position": 1234, "epoch": 2},
    "ChangelogClaim": {"generation": 7, "member": "host-1"},
    "ReplayFence": {"from_position": 1234, "epoch": 2},
    "Changelog": {"table": "members", "input_position": 12345, "generation": 3, "part": 1,
                  "parts": 2, "previous": 12000, "count": 2,
                  "key_column": "a\nb", "value_column": '{"x": 1}\n', "deleted_count": 1,
                  "deleted_column": "c", "keys": [], "values": []},
    "DeadLetter": {"batch_id": "b-1", "file": "f.csv", "row": 7, "reason": "bad id",
                   "raw": "x,,y", "line": 8},
    "EndMarker": {"batch_id": "b-1", "partition": 2, "count": 5, "total": 20, "mode": "add",
                  "segments": ["s1", "s2"], "source_position": 99, "epoch": 1},
    "SegmentChanges": {"batch_id": "b-1", "source_position": 40, "part": 0,
                       **write_columns([-1], ["u1"], ["s1"], ["remove"]), **_LEGACY_EMPTY,
                       "epoch": 1,
                       "attribute_columns": attributes.pack(pa.table({"plan": ["x"]}))},
}


def test_samples_cover_every_schema() -> None:
    names = sorted(entry.name.removesuffix(".avsc")
                   for entry in resources.files("topics").joinpath("schemas").iterdir()
                   if entry.name.endswith(".avsc"))
    assert names == sorted(REGISTRY.current) == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_schema_round_trips_with_its_fingerprint(name: str) -> None:
    raw = _load(f"schemas/{name}.avsc")
    data = encode(name, SAMPLES[name])
    assert data[:10] == single_object_header(raw)
    assert data[:10] == codec.MAGIC + REGISTRY.current[name].fingerprint
    # the body is plain Avro binary of the value, readable by any Avro implementation
    body = io.BytesIO(data[10:])
    assert fastavro.schemaless_reader(body, fastavro.parse_schema(raw), None) == SAMPLES[name]
    assert decode(data) == (name, SAMPLES[name])


def test_defaults_are_written_when_fields_are_left_out() -> None:
    schema, value = decode(encode("BatchEvent", {"batch_id": "b", "kind": "submitted",
                                                 "at_ms": 1}))
    assert schema == "BatchEvent"
    assert (value["partition"], value["sinks"], value["rows"], value["error"]) == (-1, [], 0, "")


# -- schema evolution: an old writer read by today's reader --------------------------------

def _written_by(history: str, value: dict[str, Any]) -> bytes:
    """`value` as an old writer wrote it: single-object encoded with a history schema."""
    old = _load(f"schemas/history/{history}.avsc")
    buf = io.BytesIO()
    buf.write(single_object_header(old))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old), value)
    return buf.getvalue()


def test_v1_audience_rows_is_read_with_defaults() -> None:
    v1 = _load("schemas/history/AudienceRows.v1.avsc")
    field_names = [f["name"] for f in v1["fields"]]
    assert "mode" not in field_names and "attributes" not in field_names
    old = {"batch_id": "old-1", "seqs": [1, 2], "user_ids": ["u1", "u2"],
           "segment_ids": ["s1", "s1"], "ops": ["add", "remove"]}
    data = _written_by("AudienceRows.v1", old)

    assert data[:10] != encode("AudienceRows", SAMPLES["AudienceRows"])[:10]  # another writer
    name, value = decode(data)
    assert name == "AudienceRows"
    assert value == {**old, "mode": "add", "attributes": None, "attribute_columns": None,
                     "segment_column": _NO_DICT,
                     "op_column": _NO_DICT, "count": 0, "user_id_column": "",
                     # fastavro fills a bytes default as the schema's JSON string: count 0
                     # says the packed columns are empty, so nothing reads them
                     "seq_column": "", "segment_dictionary": {"values": [], "index": ""},
                     "op_dictionary": {"values": [], "index": ""}}
    # Readers take the columns from whichever form the writer filled.
    rows = read_columns(value)
    assert (rows.seqs, rows.user_ids, rows.segment_ids, rows.ops) == (
        [1, 2], ["u1", "u2"], ["s1", "s1"], ["add", "remove"])


@pytest.mark.parametrize("history", ["AudienceRows.v2", "SegmentChanges.v1"])
def test_dictionary_column_writers_are_read_as_columns(history: str) -> None:
    old = {"batch_id": "old-2", "mode": "add", "source_position": 7, "seqs": [5, 9, -1],
           "user_ids": ["u1", "u2", "u3"], "segment_ids": [], "ops": [],
           "segment_column": {"values": ["s1", "s2"], "index": [1, 0, 1]},
           "op_column": {"values": ["add", "remove"], "index": [0, 0, 1]}}
    _name, value = decode(_written_by(history, old))
    rows = read_columns(value)
    assert (rows.seqs, rows.user_ids, rows.segment_ids, rows.ops) == (
        [5, 9, -1], ["u1", "u2", "u3"], ["s2", "s1", "s2"], ["add", "add", "remove"])


@pytest.mark.parametrize("history", ["AudienceRows.v3", "SegmentChanges.v4"])
def test_writers_before_attribute_columns_are_read_without_them(history: str) -> None:
    old = {"batch_id": "old-3", "mode": "add", "source_position": 7,
           **write_columns([5], ["u1"], ["s1"], ["add"]), **_LEGACY_EMPTY}
    if history.startswith("AudienceRows"):
        old["attributes"] = [{"plan": "gold"}]
    _name, value = decode(_written_by(history, old))
    assert value["attribute_columns"] is None
    table = attributes.read(value, 1)
    if history.startswith("AudienceRows"):  # the old string maps, as a text column
        assert table is not None and table.to_pylist() == [{"plan": "gold"}]
    else:
        assert table is None


def test_history_writer_without_a_current_reader() -> None:
    v1 = _load("schemas/history/AudienceRows.v1.avsc")
    registry = SchemaRegistry(current=[], history=[v1])
    buf = io.BytesIO()
    buf.write(single_object_header(v1))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v1), {
        "batch_id": "b", "seqs": [], "user_ids": [], "segment_ids": [], "ops": []})
    with pytest.raises(SchemaError, match="no current schema named AudienceRows"):
        registry.decode(buf.getvalue())


# -- values this registry cannot read ----------------------------------------------------

def test_unknown_fingerprint_is_a_schema_error_naming_it() -> None:
    data = single_object_header("long") + b"\x02"
    with pytest.raises(SchemaError, match="unknown writer schema fingerprint b71df49344e154d0"):
        decode(data)


@pytest.mark.parametrize("data", [
    b"", b"\xc3", b"\x00\x01" + bytes(8), b"\xc3\x02" + bytes(8), b'{"json": true}',
    b"\x00\x00\x00\x00\x01\x02",  # Confluent wire format is not single-object encoding
])
def test_bad_magic_is_a_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError, match="bad magic"):
        decode(data)


def test_truncated_header_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="unknown writer schema fingerprint"):
        decode(encode("BatchStatus", SAMPLES["BatchStatus"])[:6])


def test_schema_error_is_a_value_error() -> None:
    assert issubclass(SchemaError, ValueError)


# -- Kafka's default partitioner -----------------------------------------------------------

# Kafka's own UtilsTest vectors (Java signed ints) for Utils.murmur2
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("key", sorted(KAFKA_VECTORS))
def test_murmur2_matches_kafka_vectors(key: bytes) -> None:
    assert murmur2(key) == KAFKA_VECTORS[key] & 0x7FFFFFFF


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_murmur2_equals_kafka_python(key: bytes) -> None:
    assert murmur2(key) == kafka_murmur2(key) & 0x7FFFFFFF


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(min_value=1, max_value=10_000))
def test_partition_for_is_in_range_and_kafkas_choice(key: str, partitions: int) -> None:
    p = partition_for(key, partitions)
    assert 0 <= p < partitions
    assert p == (kafka_murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions
    assert p == murmur2(key.encode("utf-8")) % partitions

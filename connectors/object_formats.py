"""Byte encodings of change sets for object storage, and the warehouse COPY manifest.

Every encoder is deterministic (same ChangeSet -> same bytes, in any process), so an
object rewritten after a crash under its deterministic key is the same object.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq

from connectors.change_set import ARROW_SCHEMA, ChangeSet, as_type

FORMATS = ("avro", "jsonl", "parquet")
_EXTENSIONS = {"avro": ".avro", "jsonl": ".jsonl", "parquet": ".parquet"}
FIELDS = tuple(ARROW_SCHEMA.names)

# deflate rather than snappy: part of the Avro spec every reader (Redshift COPY included)
# must support, and needs no extra package.
AVRO_CODEC = "deflate"
# snappy: the Parquet default, read by Redshift COPY, Spectrum, Athena and DuckDB alike.
PARQUET_COMPRESSION = "snappy"

_AVRO_FIELDS: list[dict[str, Any]] = [
    {"name": "batch_id", "type": "string"},
    {"name": "partition", "type": "int"},
    {"name": "user_id", "type": "string"},
    {"name": "segment_id", "type": "string"},
    {"name": "op", "type": "string"},
    {"name": "seq", "type": "long"},
    # Its key (topics/positions.py): sorts as the positions do, at any width.
    {"name": "source_position", "type": "string"},
    {"name": "part", "type": "int"},
]


def _avro_schema(attributes: pa.Schema | None = None) -> Any:
    """The changes' record, plus a nullable field per attribute (`_avro_type`)."""
    extra = [] if attributes is None else [
        {"name": f.name, "type": ["null", _avro_type(f.type)], "default": None}
        for f in attributes]
    return fastavro.parse_schema({"type": "record", "name": "SegmentChange",
                                  "namespace": "audience.connectors",
                                  "fields": [*_AVRO_FIELDS, *extra]})


def _avro_type(kind: pa.DataType) -> Any:
    """The Avro type of an Arrow attribute type; "string" for anything Avro has no type for
    (its values are then written as text)."""
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_integer(kind):
        return "int" if kind.bit_width < 32 or kind == pa.int32() else "long"
    if pa.types.is_float64(kind):
        return "double"
    if pa.types.is_floating(kind):
        return "float"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_date(kind):
        return {"type": "int", "logicalType": "date"}
    if pa.types.is_timestamp(kind):
        local = "" if kind.tz else "local-"
        unit = "millis" if kind.unit in ("s", "ms") else "micros"
        return {"type": "long", "logicalType": f"{local}timestamp-{unit}"}
    if pa.types.is_decimal(kind) and kind.precision <= 38:
        return {"type": "bytes", "logicalType": "decimal", "precision": kind.precision,
                "scale": kind.scale}
    return "string"


AVRO_SCHEMA = _avro_schema()


def _avro_columns(attributes: pa.Table) -> list[list[Any]]:
    """Per attribute, its values as fastavro takes them for its `_avro_type`."""
    columns = []
    for f, column in zip(attributes.schema, attributes.columns, strict=True):
        if _avro_type(f.type) == "string" and not pa.types.is_string(f.type):
            column = as_type(column, pa.string())
        columns.append(column.to_pylist())
    return columns


# The C string escaper json.dumps(ensure_ascii=False) itself uses.
_json_str = json.encoder.encode_basestring  # type: ignore[attr-defined]


def extension(fmt: str) -> str:
    """File extension with its dot, e.g. ".avro"."""
    return _EXTENSIONS[_check_format(fmt)]


def _check_format(fmt: str) -> str:
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unknown object format {fmt!r}, expected one of {FORMATS}")
    return fmt


def _rows(changes: ChangeSet) -> Iterator[dict[str, Any]]:
    # A generator keeps one dict alive at a time; key order is the JSON key order.
    batch_id, partition = changes.batch_id, changes.partition
    extra = changes.output_attributes()
    names = () if extra is None else tuple(extra.column_names)
    values = zip(*_avro_columns(extra), strict=True) if extra is not None else repeat(())
    for (user_id, segment_id, op, seq, source_position, part), attrs in zip(
            changes.rows(), values, strict=False):
        row = {
            "batch_id": batch_id,
            "partition": partition,
            "user_id": user_id,
            "segment_id": segment_id,
            "op": op,
            "seq": seq,
            "source_position": source_position,
            "part": part,
        }
        if names:
            row.update(zip(names, attrs, strict=True))
        yield row


def avro_sync_marker(changes: ChangeSet) -> bytes:
    """16 bytes fixed by the chunk's identity; fastavro would otherwise pick random ones."""
    ident = (f"{changes.batch_id}/{changes.partition}/{changes.first_position}/"
             f"{changes.first_part}")
    return hashlib.sha256(ident.encode("utf-8")).digest()[:16]


def _encode_avro(changes: ChangeSet) -> bytes:
    buf = io.BytesIO()
    extra = changes.output_attributes()
    fastavro.writer(
        buf,
        AVRO_SCHEMA if extra is None else _avro_schema(extra.schema),
        _rows(changes),
        codec=AVRO_CODEC,
        sync_marker=avro_sync_marker(changes),
    )
    return buf.getvalue()


def _encode_jsonl(changes: ChangeSet) -> bytes:
    # Same bytes as json.dumps(row, ensure_ascii=False, separators=(",", ":")) per row,
    # built from a template: 6x faster than encoding a dict per row. ops are validated
    # "add"/"remove", seqs and parts ints, and position keys digits (or `w` and digits),
    # so only the id strings need escaping.
    head = (
        f'{{"batch_id":{_json_str(changes.batch_id)},"partition":{changes.partition:d},"user_id":'
    )
    extra = changes.output_attributes()
    if extra is None:
        return "".join(
            f'{head}{_json_str(u)},"segment_id":{_json_str(s)},"op":"{o}","seq":{q:d},'
            f'"source_position":"{sp}","part":{part:d}}}\n'
            for u, s, o, q, sp, part in changes.rows()
        ).encode("utf-8")
    tails = _json_attributes(extra)
    return "".join(
        f'{head}{_json_str(u)},"segment_id":{_json_str(s)},"op":"{o}","seq":{q:d},'
        f'"source_position":"{sp}","part":{part:d}{tail}}}\n'
        for (u, s, o, q, sp, part), tail in zip(changes.rows(), tails, strict=True)
    ).encode("utf-8")


def _json_attributes(attributes: pa.Table) -> list[str]:
    """Per row, `,"name":value` for every attribute: JSON's own types for booleans and
    numbers (NaN and infinities as null, which JSON lacks), text for the rest."""
    parts: list[list[str]] = []
    for f, column in zip(attributes.schema, attributes.columns, strict=True):
        key = f",{_json_str(f.name)}:"
        kind = f.type
        if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
            values = [key + ("null" if v is None else json.dumps(v)) for v in column.to_pylist()]
        elif pa.types.is_floating(kind):
            values = [key + ("null" if v is None or not math.isfinite(v) else repr(float(v)))
                      for v in column.to_pylist()]
        else:
            text = column if pa.types.is_string(kind) else as_type(column, pa.string())
            values = [key + ("null" if v is None else _json_str(v)) for v in text.to_pylist()]
        parts.append(values)
    return ["".join(row) for row in zip(*parts, strict=True)]


def _encode_parquet(changes: ChangeSet) -> bytes:
    buf = io.BytesIO()
    # Every option pinned so a library default change cannot silently change the bytes.
    pq.write_table(
        changes.to_arrow(),
        buf,
        compression=PARQUET_COMPRESSION,
        version="2.6",
        use_dictionary=True,
        write_statistics=True,
        data_page_version="1.0",
        row_group_size=1 << 20,
    )
    return buf.getvalue()


_ENCODERS = {"avro": _encode_avro, "jsonl": _encode_jsonl, "parquet": _encode_parquet}


def encode_changes(changes: ChangeSet, fmt: str) -> bytes:
    """The chunk as one object in fmt ("avro", "jsonl" or "parquet")."""
    return _ENCODERS[_check_format(fmt)](changes)


def decode_changes(data: bytes, fmt: str) -> list[dict[str, Any]]:
    """Rows of an encoded object, each a dict with the FIELDS keys (source_position as
    stored: a key, or an int in objects written before wide positions; read it with
    topics.positions.stored)."""
    _check_format(fmt)
    if fmt == "avro":
        return list(fastavro.reader(io.BytesIO(data)))
    if fmt == "jsonl":
        # split on "\n" only: ensure_ascii=False leaves U+2028 etc. unescaped in values.
        return [json.loads(line) for line in data.decode("utf-8").split("\n") if line]
    return pq.read_table(pa.BufferReader(data)).to_pylist()


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One data object of a batch, as a COPY manifest lists it."""

    url: str
    content_length: int  # bytes; Redshift requires it for columnar formats
    record_count: int


def encode_manifest(entries: Iterable[ManifestEntry], *, batch_id: str, fmt: str) -> bytes:
    """A Redshift `COPY ... MANIFEST` file for one batch: sorted, no timestamps."""
    _check_format(fmt)
    ordered = sorted(entries, key=lambda e: e.url)
    urls = [e.url for e in ordered]
    if len(set(urls)) != len(urls):
        # A listed twice object would be loaded twice.
        raise ValueError(f"manifest for batch {batch_id!r} lists an object twice")
    manifest = {
        "batch_id": batch_id,
        "format": fmt,
        "record_count": sum(e.record_count for e in ordered),
        "entries": [
            {
                "url": e.url,
                "mandatory": True,  # a missing object must fail the COPY, not shrink it
                "meta": {"content_length": e.content_length, "record_count": e.record_count},
            }
            for e in ordered
        ],
    }
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()

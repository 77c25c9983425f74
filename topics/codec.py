"""Avro values in single-object encoding: each value names its writer schema.

A value is `C3 01` + the 8-byte CRC-64-AVRO fingerprint of the writer schema + the Avro
body. Readers look the writer up by fingerprint and resolve it to the reader schema of the
same name, so a value written with an old schema version is read by today's code.
Old versions live in `schemas/history/` and stay registered as writers. Position fields
are of any width (topics/positions.py).
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

# Registers the `position` logical type (wide positions) before any schema is parsed.
from topics import positions as _positions  # noqa: F401

MAGIC = b"\xc3\x01"
HEADER_SIZE = 10


class SchemaError(ValueError):
    """A value this registry cannot read: unknown writer, bad magic, or no reader for it."""


@dataclass(frozen=True, slots=True)
class Schema:
    name: str  # short name, e.g. "EndMarker"
    parsed: dict[str, Any]
    fingerprint: bytes


def _schema(raw: dict[str, Any]) -> Schema:
    parsed = parse_schema(raw, _write_hint=False)
    canonical = to_parsing_canonical_form(parsed)
    return Schema(
        name=raw["name"],
        parsed=parsed,
        fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
    )


class SchemaRegistry:
    """Current (reader) schemas by name, and every known writer schema by fingerprint."""

    def __init__(self, current: Iterable[dict[str, Any]], history: Iterable[dict[str, Any]] = ()):
        self.current: dict[str, Schema] = {}
        self.writers: dict[bytes, Schema] = {}
        for raw in current:
            schema = _schema(raw)
            self.current[schema.name] = schema
            self.writers[schema.fingerprint] = schema
        for raw in history:
            schema = _schema(raw)
            self.writers.setdefault(schema.fingerprint, schema)

    def encode(self, name: str, value: dict[str, Any]) -> bytes:
        schema = self.current[name]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        schemaless_writer(buf, schema.parsed, value)
        return buf.getvalue()

    def schema_name(self, data: bytes) -> str:
        """The writer schema's name, from the header alone (no body decoding)."""
        writer = self.writers.get(data[2:HEADER_SIZE]) if data[:2] == MAGIC else None
        if writer is None:
            raise SchemaError("not a value of a known schema")
        return writer.name

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Returns (schema name, value) read with the current schema of that name."""
        if data[:2] != MAGIC:
            raise SchemaError("not an Avro single-object value (bad magic bytes)")
        writer = self.writers.get(data[2:HEADER_SIZE])
        if writer is None:
            raise SchemaError(f"unknown writer schema fingerprint {data[2:HEADER_SIZE].hex()}")
        reader = self.current.get(writer.name)
        if reader is None:
            raise SchemaError(f"no current schema named {writer.name}")
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        if reader is writer:
            return writer.name, schemaless_reader(buf, writer.parsed, None)
        return writer.name, schemaless_reader(buf, writer.parsed, reader.parsed)


class DecodeCache:
    """Recently decoded values by content. Several sinks of one worker read the same
    messages a moment apart; decoding each once is half of their cost. Keyed by the bytes
    themselves, so a hit is the same value by construction. Callers must not mutate it."""

    def __init__(self, registry: SchemaRegistry, size: int = 64):
        self.registry = registry
        self.size = size
        self._values: OrderedDict[bytes, tuple[str, dict[str, Any]]] = OrderedDict()

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        hit = self._values.get(data)
        if hit is not None:
            self._values.move_to_end(data)
            return hit
        value = self._values[data] = self.registry.decode(data)
        if len(self._values) > self.size:
            self._values.popitem(last=False)
        return value


def _load_dir(folder: str) -> list[dict[str, Any]]:
    root = resources.files("topics").joinpath(folder)
    if not root.is_dir():
        return []
    return [
        json.loads(entry.read_text(encoding="utf-8"))
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".avsc")
    ]


def load_registry() -> SchemaRegistry:
    return SchemaRegistry(_load_dir("schemas"), _load_dir("schemas/history"))


REGISTRY = load_registry()
encode = REGISTRY.encode
decode = REGISTRY.decode
schema_name = REGISTRY.schema_name
shared_decode = DecodeCache(REGISTRY).decode

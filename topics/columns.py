"""Packed columns: how messages carry thousands of rows cheaply.

A message of `AudienceRows` or `SegmentChanges` holds the rows of one partition as four
columns. fastavro reads an Avro array element by element in Python, so the columns are
packed into one Avro string or bytes value each, which it reads in one go:

- text columns (user ids): the values joined by `\\n` (ids never hold control characters:
  import rejects them); `count` says how many, so an empty column is no value at all;
- integer columns (row numbers): little-endian signed 64-bit integers, back to back;
- dictionary columns (segments, ops, which repeat on almost every row): the distinct values
  once, and per row an index into them of 1 byte (at most 256 values), 2 bytes (at most
  65,536) or 4 bytes, little-endian.

Any Avro reader with the `.avsc` files reads them; unpacking is one split or one array
read. Older writers filled plain arrays (`user_ids`, `seqs`, ...) or `DictColumn`s, and
`read_columns` takes whichever form a value holds.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SEPARATOR = "\n"
LITTLE_ENDIAN = sys.byteorder == "little"


def pack_text(values: Sequence[str]) -> str:
    text = SEPARATOR.join(values)
    if text.count(SEPARATOR) != max(len(values) - 1, 0):
        bad = next(v for v in values if SEPARATOR in v)
        raise ValueError(f"cannot pack {bad!r}: values of a text column hold no newline")
    return text


def unpack_text(text: str, count: int) -> list[str]:
    values = text.split(SEPARATOR) if count else []
    if len(values) != count:
        raise ValueError(f"a packed text column holds {len(values)} values, expected {count}")
    return values


def pack_longs(values: Sequence[int]) -> bytes:
    packed = array("q", values)
    if not LITTLE_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def unpack_longs(data: bytes) -> list[int]:
    if len(data) % 8:
        raise ValueError(f"a packed integer column of {len(data)} bytes: not 8 bytes each")
    values = array("q", data)
    if not LITTLE_ENDIAN:
        values.byteswap()
    return values.tolist()


def index_type(distinct: int) -> str:
    """The array typecode of a dictionary index over `distinct` values."""
    return "B" if distinct <= 1 << 8 else "H" if distinct <= 1 << 16 else "I"


def pack_dictionary(values: Sequence[str]) -> dict[str, Any]:
    distinct = list(dict.fromkeys(values))
    if len(distinct) == 1:
        return {"values": distinct, "index": bytes(len(values))}  # the common case: all zeros
    index = array(index_type(len(distinct)),
                  map({v: i for i, v in enumerate(distinct)}.__getitem__, values))
    if not LITTLE_ENDIAN:
        index.byteswap()
    return {"values": distinct, "index": index.tobytes()}


def unpack_dictionary(column: dict[str, Any], count: int) -> list[str]:
    distinct: list[str] = column["values"]
    index = array(index_type(len(distinct)), column["index"])
    if not LITTLE_ENDIAN:
        index.byteswap()
    if len(index) != count:
        raise ValueError(f"a dictionary column holds {len(index)} rows, expected {count}")
    if len(distinct) == 1:
        return [distinct[0]] * count
    return list(map(distinct.__getitem__, index))


@dataclass(slots=True)
class Columns:
    """Rows as columns: row i is element i of each."""

    seqs: list[int]
    user_ids: list[str]
    segment_ids: list[str]
    ops: list[str]

    def __len__(self) -> int:
        return len(self.seqs)


def write_columns(seqs: Sequence[int], user_ids: Sequence[str], segment_ids: Sequence[str],
                  ops: Sequence[str]) -> dict[str, Any]:
    """The packed fields of an `AudienceRows` or `SegmentChanges` value."""
    count = len(seqs)
    if not len(user_ids) == len(segment_ids) == len(ops) == count:
        raise ValueError(f"column lengths differ: seqs {count}, user_ids {len(user_ids)}, "
                         f"segment_ids {len(segment_ids)}, ops {len(ops)}")
    return {"count": count, "seq_column": pack_longs(seqs), "user_id_column": pack_text(user_ids),
            "segment_dictionary": pack_dictionary(segment_ids),
            "op_dictionary": pack_dictionary(ops)}


def read_columns(value: dict[str, Any]) -> Columns:
    """The rows of a value, whichever form its writer used."""
    count = value.get("count", 0)
    if count:
        return Columns(unpack_longs(value["seq_column"]),
                       unpack_text(value["user_id_column"], count),
                       unpack_dictionary(value["segment_dictionary"], count),
                       unpack_dictionary(value["op_dictionary"], count))
    return Columns(value["seqs"], value["user_ids"],
                   _legacy(value, "segment_column", "segment_ids"),
                   _legacy(value, "op_column", "ops"))


def _legacy(value: dict[str, Any], dictionary: str, plain: str) -> list[str]:
    col = value.get(dictionary)
    if col and col["index"]:
        return list(map(col["values"].__getitem__, col["index"]))
    return value[plain]

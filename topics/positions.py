"""Positions as stored: opaque, comparable values of any width, in one place.

In code a position is a Python int (topics/log.py): embedded byte offsets and Kafka offsets
are small, a Kinesis position (shard, sequence number of up to 129 digits, sub-sequence)
is packed into one int far above 2**64. Every layer that stores one uses this module:

- Avro values (`AVRO_TYPE`): a union of `long` (every position and sentinel that fits, so
  a narrow value encodes as it always did, plus one union byte) and a decimal `string` for
  the wide ones, tagged with the logical type `position` so fastavro hands back an int
  either way. A writer schema of plain `long` resolves to the union's first branch: values
  written before the union stay readable through the history schemas.
- Text that must sort like the numbers (`key`): object names, warehouse columns, the
  `source_position` column of the S3 objects. A position below 10**20 is its 20 zero-padded
  digits, exactly the old object names; a wider one is `w`, the digit count of its digit
  count, its digit count, then its digits: `w` sorts after every digit, and among wide
  keys the length fields compare before the digits, so text order is number order. -1
  ("at the source", "none") is the empty text, first in any order. Keys hold only digits
  and `w`, so they sort the same under any collation; warehouse columns still compare
  bytewise where they can (COLLATE "C" on PostgreSQL) as that is also the cheapest.
  Example: 42 is `00000000000000000042`, 10**20 is `w221100000000000000000000`. Readers of
  old data take both an int and a key (`stored`). A key holds up to 999,999,999 digits.
- Commit metadata (a sink's stamp) and snapshot headers are decimal text and JSON: any
  width already. Kafka offsets stay int64 (Kafka positions are offsets).
"""

from __future__ import annotations

from typing import Any

import fastavro.read
import fastavro.write

NARROW_DIGITS = 20  # positions below 10**20 keep the old 20-digit names
_NARROW_LIMIT = 10**NARROW_DIGITS
WIDE = "w"
NONE = -1  # the one negative position a key holds
NONE_KEY = ""  # sorts first under every collation, not only bytewise
LOGICAL_TYPE = "position"
# The Avro type of every position field of topics/schemas (see the module doc).
AVRO_TYPE = ["long", {"type": "string", "logicalType": LOGICAL_TYPE}]


def key(position: int) -> str:
    """The order-preserving text of a position (>= -1): key(a) < key(b) iff a < b."""
    if 0 <= position < _NARROW_LIMIT:
        return f"{position:0{NARROW_DIGITS}d}"
    if position == NONE:
        return NONE_KEY
    if position < 0:
        raise ValueError(f"position {position}: positions are -1 or above")
    digits = str(position)
    count = str(len(digits))
    if len(count) > 9:
        raise ValueError(f"a position of {len(digits)} digits is wider than a key holds")
    return f"{WIDE}{len(count)}{count}{digits}"


def from_key(text: str) -> int:
    """The position a `key` names; ValueError for anything else."""
    if text == NONE_KEY:
        return NONE
    if len(text) == NARROW_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    if text[:1] == WIDE and len(text) > 2 and text[1].isdigit():
        size = int(text[1])
        count, digits = text[2 : 2 + size], text[2 + size :]
        if (count.isascii() and count.isdigit() and digits.isascii() and digits.isdigit()
                and len(count) == size and int(count) == len(digits) > NARROW_DIGITS
                and count[0] != "0" and digits[0] != "0"):  # one key per position
            return int(digits)
    raise ValueError(f"{text!r} is not a position key (20 digits, or w<n><digits>...)")


def stored(value: Any) -> int:
    """A position read back from storage written by any version: an int (old int64
    columns and objects, Avro longs) or a key (the text form)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii")
    if isinstance(value, str):
        return from_key(value)
    raise ValueError(f"{value!r} is not a stored position")


def _avro_write(datum: Any, schema: Any) -> str:
    return str(datum)


def _avro_read(data: str, writer_schema: Any, reader_schema: Any) -> int:
    return int(data)


# fastavro picks a union's first branch that takes the value: `long` for every int that
# fits, the tagged string for the rest. Registered once, on import (topics.codec imports
# this module before it parses a schema).
fastavro.write.LOGICAL_WRITERS[f"string-{LOGICAL_TYPE}"] = _avro_write
fastavro.read.LOGICAL_READERS[f"string-{LOGICAL_TYPE}"] = _avro_read

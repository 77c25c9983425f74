"""Attribute columns: the extra columns of an input file, typed, on row and change messages.

A message of `AudienceRows` or `SegmentChanges` carries its rows' attributes (`country`,
`plan`, ...) in `attribute_columns`: one Arrow IPC stream holding one record batch with a
column per attribute and a row per row of the message (null where a row lacks one). Arrow
because the types of the file must survive to the outputs (a Parquet input's int64 or
timestamp stays one) and because picking the rows that became changes is one `take`.
A message without attributes has null there: files without extra columns pay nothing.

Older writers of `AudienceRows` filled `attributes`, one string map per row; `read` takes
either form. pyarrow is imported on first use, so only messages with attributes load it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

FIELD = "attribute_columns"


def pack(table: pa.Table | pa.RecordBatch | None) -> bytes | None:
    """The Arrow IPC stream of `table` (one record batch), or None without attributes."""
    if table is None or not table.num_columns:
        return None
    import pyarrow as pa

    if isinstance(table, pa.Table):
        table = table.combine_chunks()
        batches = table.to_batches()
        batch = batches[0] if batches else pa.RecordBatch.from_pylist([], table.schema)
    else:
        batch = table
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def unpack(data: bytes) -> pa.Table:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def read(value: Mapping[str, Any], count: int) -> pa.Table | None:
    """The attributes of a message as a table of `count` rows, or None when it has none."""
    data = value.get(FIELD)
    if data is not None:
        table = unpack(data)
        if table.num_rows != count:
            raise ValueError(f"attribute columns of {table.num_rows} rows, expected {count}")
        return table
    legacy = value.get("attributes")
    if legacy:  # an older writer: one map of strings per row
        return from_dicts(legacy, {})
    return None


def from_dicts(rows: Sequence[Mapping[str, Any]],
               types: Mapping[str, pa.DataType]) -> pa.Table | None:
    """A column per key, in order of first appearance, of type `types[key]` (string when
    not named, or when a value does not convert): null where a row lacks the key."""
    import pyarrow as pa

    names = list(dict.fromkeys(key for row in rows for key in row))
    if not names:
        return None
    columns = []
    for name in names:
        text = pa.array([row.get(name) for row in rows], pa.string())
        kind = types.get(name)
        if kind is not None and kind != pa.string():
            # A value the type does not take (a number too big, say): the column stays text.
            with suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
                text = text.cast(kind)
        columns.append(text)
    return pa.Table.from_arrays(columns, names=names)


def take(table: pa.Table | None, indices: Sequence[int]) -> pa.Table | None:
    """The rows `indices` of `table`."""
    if table is None:
        return None
    import pyarrow as pa

    return table.take(pa.array(indices, pa.int64()))

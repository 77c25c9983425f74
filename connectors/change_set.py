"""Membership changes of one chunk of one (batch, partition), as Arrow columns.

Arrow because every sink wants columns: the warehouse loads them and Parquet writes them
as they are, and Avro and JSON Lines take a row view. The columns come straight from the
packed columns of `SegmentChanges` messages (`record_batch`), with no Python object per
row: a chunk of 100,000 changes is ~4 MB of Arrow buffers instead of ~12 MB of lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from connectors.rows import OPS
from topics import attributes as attribute_columns
from topics import positions
from topics.columns import LITTLE_ENDIAN, index_type, read_columns
from topics.positions import key

# Field order here is the order of every encoded format (Avro schema, JSON keys, Parquet).
ARROW_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("op", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        # Where the change was made: the position of the input message the segments
        # processor made it from, and which of that input's SegmentChanges messages carried
        # it. Rows fold in log order by (partition, source_position, part, row), across
        # batches too (batches may interleave on a partition). Last, so that tables built
        # on the earlier columns only need columns added. The position as its key
        # (topics/positions.py): text of any width that sorts as the numbers do, so every
        # format, SQL engine and warehouse column orders by it (objects written before
        # wide positions hold an int64 here: readers take both, `positions.stored`).
        pa.field("source_position", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),
    ]
)
# The columns a chunk carries; batch_id and partition are the same on every row.
CHANGE_COLUMNS = pa.schema(list(ARROW_SCHEMA)[2:])
_INDEX_TYPES = {"B": pa.uint8(), "H": pa.uint16(), "I": pa.uint32()}


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Changes in the order they were made; later changes of a (segment, user) win.

    A chunk is named by (first_position, first_part), the stamp of its first change: no
    two chunks of a (batch, partition) share it, even where one input's changes (a replace
    end marker's removals) fill many chunks.
    """

    batch_id: str
    partition: int
    first_position: int  # source position of the first change (deterministic)
    first_part: int  # and the part of its message
    columns: pa.Table  # CHANGE_COLUMNS: user_id, segment_id, op, seq (-1: removed by
    # replace), source_position, part
    # The input file's extra columns, a row per change (null where a row lacks one, and on
    # a replace's removals); None when no change of the chunk has any. The warehouse keeps
    # memberships only and ignores them.
    attributes: pa.Table | None = None

    def __post_init__(self) -> None:
        # Catch a producer bug here rather than as a bad load in the warehouse.
        if not self.columns.schema.equals(CHANGE_COLUMNS):
            raise ValueError(f"{self._name()}: columns {self.columns.schema.names} of types "
                             f"{self.columns.schema.types}, expected {CHANGE_COLUMNS}")
        bad = set(pc.unique(self.columns["op"]).to_pylist()).difference(OPS)
        if bad:
            raise ValueError(f"{self._name()}: unknown ops {sorted(bad)}, expected one of {OPS}")
        if self.attributes is not None and self.attributes.num_rows != len(self):
            raise ValueError(f"{self._name()}: {self.attributes.num_rows} rows of attributes "
                             f"for {len(self)} changes")
        if len(self):
            first = (positions.from_key(self.columns["source_position"][0].as_py()),
                     self.columns["part"][0].as_py())
            if first != (self.first_position, self.first_part):
                raise ValueError(f"{self._name()}: its first change is stamped {first}")

    @classmethod
    def from_lists(cls, batch_id: str, partition: int, first_position: int,
                   user_ids: Sequence[str], segment_ids: Sequence[str], ops: Sequence[str],
                   seqs: Sequence[int], *, first_part: int = 0,
                   source_positions: Sequence[int] | None = None,
                   parts: Sequence[int] | None = None,
                   attributes: pa.Table | None = None) -> ChangeSet:
        """Columns from lists; without source_positions and parts, every change comes from
        the one message (first_position, first_part)."""
        n = len(user_ids)
        stamps = [first_position] * n if source_positions is None else source_positions
        parts = [first_part] * n if parts is None else parts
        if not len(segment_ids) == len(ops) == len(seqs) == len(stamps) == len(parts) == n:
            raise ValueError(
                f"ChangeSet {batch_id}/{partition}@{first_position}: column lengths differ "
                f"(user_ids={n}, segment_ids={len(segment_ids)}, ops={len(ops)}, "
                f"seqs={len(seqs)}, source_positions={len(stamps)}, parts={len(parts)})")
        return cls(batch_id, partition, first_position, first_part, pa.Table.from_arrays(
            [*_arrays(user_ids, segment_ids, ops, seqs),
             pa.array([key(p) for p in stamps], pa.string()),
             pa.array(parts, pa.int32())], schema=CHANGE_COLUMNS), attributes)

    def _name(self) -> str:
        return (f"ChangeSet {self.batch_id}/{self.partition}"
                f"@{self.first_position}.{self.first_part}")

    def __len__(self) -> int:
        return self.columns.num_rows

    @property
    def user_ids(self) -> list[str]:
        return self.columns["user_id"].to_pylist()

    @property
    def segment_ids(self) -> list[str]:
        return self.columns["segment_id"].to_pylist()

    @property
    def ops(self) -> list[str]:
        return self.columns["op"].to_pylist()

    @property
    def seqs(self) -> list[int]:
        return self.columns["seq"].to_pylist()

    @property
    def source_positions(self) -> list[int]:
        return [positions.from_key(k) for k in self.source_keys]

    @property
    def source_keys(self) -> list[str]:
        """The source positions as stored (their keys)."""
        return self.columns["source_position"].to_pylist()

    @property
    def parts(self) -> list[int]:
        return self.columns["part"].to_pylist()

    def rows(self) -> Iterator[tuple[str, str, str, int, str, int]]:
        """(user_id, segment_id, op, seq, source_position key, part) per change, for the
        row-wise formats."""
        return zip(self.user_ids, self.segment_ids, self.ops, self.seqs, self.source_keys,
                   self.parts, strict=True)

    def output_attributes(self) -> pa.Table | None:
        """The attributes as output columns: an attribute named like a column of
        ARROW_SCHEMA is renamed `attr_<name>` so that it cannot shadow one."""
        if self.attributes is None:
            return None
        taken = set(ARROW_SCHEMA.names)
        names = []
        for name in self.attributes.column_names:
            while name in taken:
                name = f"attr_{name}"
            taken.add(name)
            names.append(name)
        return self.attributes.rename_columns(names)

    def to_arrow(self) -> pa.Table:
        """Columns batch_id, partition, user_id, segment_id, op, seq, source_position, part
        (ARROW_SCHEMA), then the attributes, if any (`output_attributes`)."""
        n = len(self)
        table = pa.Table.from_arrays(
            [pa.repeat(pa.scalar(self.batch_id, pa.string()), n),
             pa.repeat(pa.scalar(self.partition, pa.int32()), n),
             *self.columns.columns],
            schema=ARROW_SCHEMA)
        extra = self.output_attributes()
        if extra is not None:
            for field, column in zip(extra.schema, extra.columns, strict=True):
                table = table.append_column(field, column)
        return table


def record_batch(value: dict[str, Any]) -> pa.RecordBatch:
    """The changes of one `SegmentChanges` value as CHANGE_COLUMNS, read from its packed
    columns in bulk (see topics/columns.py for their layout)."""
    count = value.get("count", 0)
    if not count or not LITTLE_ENDIAN:  # an older writer's arrays (or a rare host): lists
        rows = read_columns(value)
        return pa.RecordBatch.from_arrays(
            [*_arrays(rows.user_ids, rows.segment_ids, rows.ops, rows.seqs),
             *_stamp_columns(value, len(rows))], schema=CHANGE_COLUMNS)
    users = pc.split_pattern(pa.array([value["user_id_column"]], pa.string()), "\n").flatten()
    seqs = value["seq_column"]
    if len(users) != count or len(seqs) != 8 * count:
        raise ValueError(f"a SegmentChanges value of {count} rows holds {len(users)} user ids "
                         f"and {len(seqs) / 8:g} row numbers")
    return pa.RecordBatch.from_arrays(
        [users, _dictionary(value["segment_dictionary"], count),
         _dictionary(value["op_dictionary"], count),
         pa.Array.from_buffers(pa.int64(), count, [None, pa.py_buffer(seqs)]),
         *_stamp_columns(value, count)],
        schema=CHANGE_COLUMNS)


def _stamp_columns(value: dict[str, Any], count: int) -> list[pa.Array]:
    """source_position and part: the same on every row of one message."""
    return [pa.repeat(pa.scalar(key(value["source_position"]), pa.string()), count),
            pa.repeat(pa.scalar(value.get("part", 0), pa.int32()), count)]


def _arrays(user_ids: Sequence[str], segment_ids: Sequence[str], ops: Sequence[str],
            seqs: Sequence[int]) -> list[pa.Array]:
    """The first four of CHANGE_COLUMNS from Python lists."""
    return [pa.array(user_ids, pa.string()), pa.array(segment_ids, pa.string()),
            pa.array(ops, pa.string()), pa.array(seqs, pa.int64())]


def _dictionary(column: dict[str, Any], count: int) -> pa.Array:
    distinct = column["values"]
    index_of = _INDEX_TYPES[index_type(len(distinct))]
    if len(column["index"]) != count * index_of.byte_width:
        raise ValueError(f"a dictionary column of {len(column['index'])} bytes for {count} rows")
    index = pa.Array.from_buffers(index_of, count, [None, pa.py_buffer(column["index"])])
    return pc.take(pa.array(distinct, pa.string()), index)


def record_attributes(value: dict[str, Any], count: int) -> pa.Table | None:
    """The attributes of one `SegmentChanges` value, or None when it has none."""
    return attribute_columns.read(value, count)


def combine_attributes(parts: Sequence[tuple[int, pa.Table | None]]) -> pa.Table | None:
    """The attributes of consecutive messages (rows, attributes or None) as one table: a
    column per name in order of first appearance, null where a message lacks it; a name
    typed differently by two messages takes the wider type (int64 and double: double), or
    text where there is none."""
    tables = [t for _n, t in parts if t is not None]
    if not tables:
        return None
    kinds: dict[str, list[pa.DataType]] = {}
    for table in tables:
        for f in table.schema:
            kinds.setdefault(f.name, []).append(f.type)
    schema = pa.schema([pa.field(name, _common_type(name, types))
                        for name, types in kinds.items()])
    out = []
    for n, table in parts:
        columns = []
        for f in schema:
            if table is None or f.name not in table.column_names:
                columns.append(pa.nulls(n, f.type))
            else:
                columns.append(as_type(table[f.name], f.type))
        out.append(pa.Table.from_arrays(columns, schema=schema))
    return pa.concat_tables(out).combine_chunks()


def _common_type(name: str, types: list[pa.DataType]) -> pa.DataType:
    if all(t == types[0] for t in types):
        return types[0]
    try:
        return pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in types],
                                promote_options="permissive").field(name).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.string()


def as_type(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    if column.type == kind:
        return column
    try:
        return column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # nested values as JSON text
        return pa.chunked_array([pa.array(
            [None if v is None else json.dumps(v, ensure_ascii=False, default=str)
             for v in column.to_pylist()], pa.string())], pa.string())


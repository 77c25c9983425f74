"""Membership changes of one chunk of one (batch, partition), as parallel columns.

Columnar because every sink wants columns: Arrow for the warehouse and Parquet, and a
cheap row view for Avro and JSON Lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from connectors.rows import OPS

# Field order here is the order of every encoded format (Avro schema, JSON keys, Parquet).
ARROW_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("op", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Changes in the order they were made; later changes of a (segment, user) win."""

    batch_id: str
    partition: int
    first_position: int  # log position of the first input this chunk covers (deterministic)
    user_ids: list[str]
    segment_ids: list[str]
    ops: list[str]  # "add" | "remove"
    seqs: list[int]  # row number in the source file; -1 for removals by a replace end marker

    def __post_init__(self) -> None:
        # Catch a producer bug here rather than as a misaligned load in the warehouse.
        n = len(self.user_ids)
        if not len(self.segment_ids) == len(self.ops) == len(self.seqs) == n:
            raise ValueError(
                f"ChangeSet {self.batch_id}/{self.partition}@{self.first_position}: column "
                f"lengths differ (user_ids={n}, segment_ids={len(self.segment_ids)}, "
                f"ops={len(self.ops)}, seqs={len(self.seqs)})"
            )
        bad = set(self.ops).difference(OPS)
        if bad:
            raise ValueError(
                f"ChangeSet {self.batch_id}/{self.partition}@{self.first_position}: "
                f"unknown ops {sorted(bad)}, expected one of {OPS}"
            )

    def __len__(self) -> int:
        return len(self.user_ids)

    def to_arrow(self) -> pa.Table:
        """Columns batch_id, partition, user_id, segment_id, op, seq (ARROW_SCHEMA)."""
        n = len(self)
        return pa.Table.from_arrays(
            [
                pa.array([self.batch_id] * n, pa.string()),
                pa.array([self.partition] * n, pa.int32()),
                pa.array(self.user_ids, pa.string()),
                pa.array(self.segment_ids, pa.string()),
                pa.array(self.ops, pa.string()),
                pa.array(self.seqs, pa.int64()),
            ],
            schema=ARROW_SCHEMA,
        )

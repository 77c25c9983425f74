"""Rows read from an input file, in the columnar chunks the importer publishes.

Columnar because the importer packs rows into one Avro message per partition: lists of
column values are what both the partitioner and fastavro's array encoder want.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OPS = ("add", "remove")
MODES = ("add", "remove", "replace")


class InputFileError(Exception):
    """A whole-file problem (no such file, empty, no header, unknown format, not UTF-8).

    Raised before anything is published; the message names the file and what was expected.
    """


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A row that failed validation: it goes to the dead-letter topic."""

    file: str
    row: int  # 1-based number of the data record in the file (header not counted)
    reason: str
    raw: str  # the row as read, truncated to a bounded length
    line: int = 0  # physical line the record starts on (text formats; 0: not known)


@dataclass(slots=True)
class RowChunk:
    """Valid rows of one stretch of the file, as parallel columns, plus the rejects in it."""

    seqs: list[int] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    segment_ids: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    # None when the file has no extra columns; else one dict per valid row.
    attributes: list[dict[str, str]] | None = None
    # The type each attribute has in the file (a `pyarrow.DataType` by name), where the
    # format has types: Parquet's own, JSON's for JSON Lines; the values above are their
    # text, converted back when the importer packs them. Unnamed: strings.
    attribute_types: dict[str, Any] = field(default_factory=dict)
    rejects: list[RejectedRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

"""The sink side of `audience.segment-changes`: buffers each (batch, partition)'s changes
into chunks, hands chunks to a writer, and at the end marker checks the count, closes the
partition in the writer and reports `sink_committed`.

Merge in log order: batches may interleave on a partition, and the segments processor
folds their changes in log order, so at every end marker of a partition the sink first
flushes every open buffer of that partition (all batches), then closes the marker's
(batch, partition) up to the marker's source position: the writer applies everything of
the partition up to there in log order (the warehouse merges it; objects carry their
stamps so that readers can fold them the same way).

A chunk is cut when it reaches `chunk_rows` or at any end marker of its partition, and is
named by the stamp (source position, part) of its first change: chunk boundaries and
names are a function of the change log alone, so a rewrite after a crash or a replay
produces the same chunks, and no two chunks share a name (one input's changes, a replace
end marker's removals, can fill many chunks). Offsets are committed only where no batch
is open on a partition, so a restarted sink re-reads every open batch from its start and
rebuilds every chunk of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from connectors.change_set import (
    CHANGE_COLUMNS,
    ChangeSet,
    combine_attributes,
    record_attributes,
    record_batch,
)
from processors.events import batch_event
from streams.api import Input, Output
from streams.faults import crash_point
from topics.spec import CHANGES

# Outputs of one input, in emission order: its SegmentChanges parts 0, 1, ..., then the
# EndMarker after every part.
END_MARKER_ORDER = 1 << 32


class ChangeWriter(Protocol):
    name: str

    def write_chunk(self, changes: ChangeSet) -> None:
        """Durably writes one chunk; writing the same chunk again changes nothing."""

    def close_partition(self, batch_id: str, partition: int, partitions: int,
                        end_position: int) -> str:
        """Makes a (batch, partition) final, exactly once, and with it everything written
        of the partition (any batch) at or below `end_position`, the source position of
        the batch's end marker there; returns where its output is."""

    def reset_partition(self, partition: int) -> None:
        """Forgets what was written of a partition's open batches (about to be re-read)."""


@dataclass
class _Open:
    first: tuple[int, int] = (-1, 0)  # stamp of the chunk's first change
    batches: list[pa.RecordBatch] = field(default_factory=list)  # of the chunk being filled
    # Per entry of `batches`, its rows and attributes (None: none); None while no message
    # of the chunk has any, so files without attributes keep nothing here.
    attributes: list[tuple[int, pa.Table | None]] | None = None
    rows: int = 0  # in `batches`
    received: int = 0  # changes of the batch in this partition so far, all chunks


class ChangeSink:
    topic = CHANGES

    def __init__(self, writer: ChangeWriter, partitions: int, chunk_rows: int = 100_000):
        self.writer = writer
        self.name = writer.name
        self.partitions = partitions
        self.chunk_rows = chunk_rows
        self._open: dict[tuple[str, int], _Open] = {}

    def stamp(self, record: Input) -> tuple[int, int]:
        v = record.value
        order = v["part"] if record.schema == "SegmentChanges" else END_MARKER_ORDER
        return v["source_position"], order

    def idle(self, partition: int) -> bool:
        return not any(p == partition for _b, p in self._open)

    def reset(self, partition: int) -> None:
        for key in [k for k in self._open if k[1] == partition]:
            del self._open[key]
        self.writer.reset_partition(partition)

    def process(self, record: Input) -> list[Output]:
        v = record.value
        key = (v["batch_id"], record.partition)
        buf = self._open.setdefault(key, _Open())
        if record.schema == "SegmentChanges":
            if v.get("part", 0):  # a replace's removals come in parts
                crash_point(f"sink-{self.name}.between_removal_parts")
            if not buf.rows:
                buf.first = (v["source_position"], v.get("part", 0))
            changes = record_batch(v)
            attrs = record_attributes(v, changes.num_rows)
            if attrs is not None and buf.attributes is None:
                buf.attributes = [(b.num_rows, None) for b in buf.batches]
            if buf.attributes is not None:
                buf.attributes.append((changes.num_rows, attrs))
            buf.batches.append(changes)
            buf.rows += changes.num_rows
            buf.received += changes.num_rows
            if buf.rows >= self.chunk_rows:
                self._flush(key, buf)
            return []
        return self._end_marker(key, buf, record)

    def _flush(self, key: tuple[str, int], buf: _Open) -> None:
        if buf.rows:
            # One contiguous chunk: the bytes of an object must not depend on how the
            # changes were split into messages.
            columns = pa.Table.from_batches(buf.batches, CHANGE_COLUMNS).combine_chunks()
            attrs = combine_attributes(buf.attributes) if buf.attributes else None
            self.writer.write_chunk(ChangeSet(key[0], key[1], *buf.first, columns, attrs))
            crash_point(f"sink-{self.name}.after_chunk")
            buf.batches, buf.rows, buf.attributes = [], 0, None

    def _end_marker(self, key: tuple[str, int], buf: _Open, record: Input) -> list[Output]:
        batch_id, partition = key
        # Everything before the marker on this partition is written before it closes: the
        # close applies it all in log order, whichever batch it belongs to.
        for other in sorted(k for k in self._open if k[1] == partition and k != key):
            self._flush(other, self._open[other])
        self._flush(key, buf)
        del self._open[key]
        expected = record.value["count"]
        # Closed even when the count is off: the partition's later batches merge in log
        # order after this one, and the batch fails loudly either way.
        location = self.writer.close_partition(batch_id, partition, self.partitions,
                                               record.value["source_position"])
        crash_point(f"sink-{self.name}.after_close")
        if buf.received != expected:
            error = (f"sink {self.name}: partition {partition} of {self.topic} holds "
                     f"{buf.received} changes of batch {batch_id} but its end marker says "
                     f"{expected}")
            return [batch_event(batch_id, "failed", record.timestamp_ms, partition=partition,
                                step=f"sink:{self.name}", error=error)]
        return [batch_event(batch_id, "sink_committed", record.timestamp_ms, partition=partition,
                            sink=self.name, changes=expected, location=location)]

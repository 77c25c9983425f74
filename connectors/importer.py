"""The file importer: validates a file into a local spool, then publishes it.

1. Checksum the file; the batch id derives from it unless given.
2. Ask the batch table whether the batch exists: the same file again changes nothing; a
   different file under an existing explicit batch id is refused; a batch whose import was
   cut short is resumed (rows the processor already holds are skipped there by seq).
3. Read, validate and partition every row (murmur2 of user_id, as Kafka's producer would),
   packing each partition's rows into messages in the spool; bad rows go to the dead-letter
   topic. Past the error budget the batch fails here, before any row is published.
4. Publish the spool, record `published` with the per-partition counts, then write one END
   MARKER to every partition.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

from connectors.error_budget import ErrorBudget
from connectors.readers import file_checksum, read_chunks
from connectors.rows import MODES, InputFileError, RowChunk
from connectors.spool import Spool, spool_path
from processors.events import batch_event
from processors.pipeline_state import FAILED, PUBLISHED, SUBMITTED, BatchStatus, PipelineState
from streams.faults import crash_point
from streams.outputs import OutputWriter
from streams.state.table_reader import read_table
from topics.codec import encode
from topics.columns import write_columns
from topics.log import Log
from topics.partitioner import KAFKA_SEED
from topics.spec import DEAD_LETTER, ROWS

from murmurhash2 import murmurhash2  # isort: skip

BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RAW_LIMIT = 500
PUBLISH_FLUSH_EVERY = 16


class ImportRefused(Exception):
    """The request contradicts what the pipeline already holds (e.g. a reused batch id)."""


@dataclass(frozen=True)
class ImportRequest:
    path: str
    segment: str | None = None
    mode: str = "add"
    batch_id: str | None = None
    fmt: str | None = None
    max_rejects: ErrorBudget = field(default_factory=lambda: ErrorBudget(fraction=0.01))
    sinks: tuple[str, ...] = ("s3", "warehouse")
    message_rows: int = 5000


@dataclass
class ImportResult:
    batch_id: str
    checksum: str
    outcome: str  # published | resumed | duplicate | previously_failed | failed
    rows: int = 0
    rejected: int = 0
    partition_counts: list[int] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


def now_ms() -> int:
    return int(time.time() * 1000)


class Importer:
    def __init__(self, log: Log, spool_dir: Path,
                 progress: Callable[[int], None] | None = None):
        self.log = log
        self.spool_dir = spool_dir
        self.progress = progress or (lambda rows: None)
        self.out = OutputWriter(log, log.producer())
        self.partitions = len(log.partitions(ROWS))

    def run(self, req: ImportRequest) -> ImportResult:
        started = time.monotonic()
        if req.mode not in MODES:
            raise ValueError(f"--mode {req.mode!r}: expected one of {', '.join(MODES)}")
        if req.batch_id is not None and not BATCH_ID.match(req.batch_id):
            raise ValueError(f"--batch-id {req.batch_id!r}: expected 1-128 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
        checksum = file_checksum(req.path)
        batch_id = req.batch_id or f"b-{checksum[:20]}"
        status: BatchStatus | None = read_table(self.log, PipelineState(), "batches").get(batch_id)
        if status is not None and status.checksum != checksum:
            raise ImportRefused(
                f"batch id {batch_id} already names another file ({status.source}, sha256 "
                f"{status.checksum[:12]}...); {req.path} has sha256 {checksum[:12]}...: "
                "choose another --batch-id")
        if status is not None and status.status not in (SUBMITTED, PUBLISHED):
            outcome = "previously_failed" if status.status == FAILED else "duplicate"
            return ImportResult(batch_id, checksum, outcome, status.rows, status.rejected,
                                list(status.partition_counts), status.error)
        if status is not None and status.status == PUBLISHED:
            # Rows and counts are all on the topic; only end markers may be missing.
            self._end_markers(batch_id, req.mode, list(status.partition_counts), status.rows,
                              list(status.segments))
            return ImportResult(batch_id, checksum, "resumed", status.rows, status.rejected,
                                list(status.partition_counts), seconds=time.monotonic() - started)
        result = self._import(req, batch_id, checksum, submit=status is None)
        result.seconds = time.monotonic() - started
        return result

    def _import(self, req: ImportRequest, batch_id: str, checksum: str,
                submit: bool) -> ImportResult:
        chunks = read_chunks(req.path, segment=req.segment, mode=req.mode, fmt=req.fmt)
        # Whole-file problems raise in the first chunks, before anything is sent.
        head: list[RowChunk] = []
        for chunk in chunks:
            head.append(chunk)
            if len(chunk) or chunk.rejects:
                break
        else:
            raise InputFileError(f"{req.path}: no data rows; expected at least one row after "
                                 "the header")
        if submit:
            self.out.send(batch_event(batch_id, "submitted", now_ms(), source=req.path,
                                      checksum=checksum, mode=req.mode, sinks=list(req.sinks)))
            self.out.flush()
        counts = [0] * self.partitions
        rejected = 0
        segments: set[str] = set()
        with Spool(spool_path(self.spool_dir, batch_id)) as spool:
            try:
                for chunk in chain(head, chunks):
                    rejected += self._dead_letters(batch_id, chunk)
                    rejected += self._spool_chunk(spool, batch_id, req, chunk, counts,
                                                  segments)
                    self.progress(sum(counts) + rejected)
            except InputFileError as exc:  # found mid-file (a corrupt Parquet page)
                self.out.send(batch_event(batch_id, "failed", now_ms(), step="import",
                                          error=str(exc)))
                self.out.flush()
                raise
            spool.finish()
            rows = sum(counts)
            self.out.flush()  # dead letters
            if req.max_rejects.exceeded(rejected, rows + rejected) or rows == 0:
                error = (f"{req.path}: {rejected} of {rows + rejected} rows rejected, over the "
                         f"error budget of {req.max_rejects}; see topic {DEAD_LETTER}")
                self.out.send(batch_event(batch_id, "failed", now_ms(), step="import",
                                          error=error, rows=rows, rejected=rejected))
                self.out.flush()
                return ImportResult(batch_id, checksum, "failed", rows, rejected, counts, error)
            producer = self.out.producer
            for i, (partition, value) in enumerate(spool, start=1):
                producer.send(ROWS, partition, value)
                if i % PUBLISH_FLUSH_EVERY == 0:  # bounded memory in the producer
                    producer.flush()
                    crash_point("import.publishing")
            producer.flush()
        self.out.send(batch_event(batch_id, "published", now_ms(), rows=rows, rejected=rejected,
                                  partition_counts=counts, segments=sorted(segments)))
        self.out.flush()
        crash_point("import.before_end_markers")
        self._end_markers(batch_id, req.mode, counts, rows, sorted(segments))
        return ImportResult(batch_id, checksum, "published", rows, rejected, counts)

    def _spool_chunk(self, spool: Spool, batch_id: str, req: ImportRequest, chunk: RowChunk,
                     counts: list[int], segments: set[str]) -> int:
        """Spools the chunk's rows as messages per partition, adding their segments to
        `segments`; returns the rows rejected for being too big for a message on their own
        (sent to the dead-letter topic)."""
        n, spooled = self.partitions, 0
        rows_of: list[list[int]] = [[] for _ in range(n)]  # row indexes per partition
        append = [rows.append for rows in rows_of]
        hashes = map(murmurhash2, map(str.encode, chunk.user_ids), repeat(KAFKA_SEED))
        for i, h in enumerate(hashes):
            append[(h & 0x7FFFFFFF) % n](i)
        step = req.message_rows
        for partition in range(n):
            # Columns are gathered per partition with itemgetter: the loop stays in C.
            pick = _picker(rows_of[partition])
            seqs, users = pick(chunk.seqs), pick(chunk.user_ids)
            segs, ops = pick(chunk.segment_ids), pick(chunk.ops)
            attrs = pick(chunk.attributes) if chunk.attributes is not None else None
            for start in range(0, len(seqs), step):
                end = start + step
                spooled_here = self._spool_rows(
                    spool, batch_id, req, partition, segments, seqs[start:end], users[start:end],
                    segs[start:end], ops[start:end], attrs[start:end] if attrs else None)
                counts[partition] += spooled_here
                spooled += spooled_here
        return len(chunk) - spooled

    def _spool_rows(self, spool: Spool, batch_id: str, req: ImportRequest, partition: int,
                    segments: set[str], seqs: list[int], users: list[str], segs: list[str],
                    ops: list[str],
                    attrs: list[dict[str, str]] | None) -> int:
        """The rows as one message, or in halves while that is over the log's message
        limit; a single row over it is a bad row. Returns the rows spooled."""
        value = encode("AudienceRows", {"batch_id": batch_id, "mode": req.mode,
                                        **write_columns(seqs, users, segs, ops),
                                        "attributes": attrs})
        limit = self.log.max_message_bytes
        if len(value) <= limit:
            spool.add(partition, value)
            segments.update(segs)  # the segments a replace batch names: of rows it holds
            return len(seqs)
        if len(seqs) == 1:
            keys = f", attributes {sorted(attrs[0])}" if attrs else ""
            self.out.producer.send(DEAD_LETTER, 0, encode("DeadLetter", {
                "batch_id": batch_id, "file": req.path, "row": seqs[0],
                "reason": f"row is {len(value):,} bytes as a message, over the log's "
                          f"{limit:,}-byte message limit",
                "raw": f"user_id={users[0]!r}, segment_id={segs[0]!r}{keys}"[:RAW_LIMIT]}))
            return 0
        h = len(seqs) // 2
        return (self._spool_rows(spool, batch_id, req, partition, segments, seqs[:h],
                                 users[:h], segs[:h], ops[:h], attrs[:h] if attrs else None)
                + self._spool_rows(spool, batch_id, req, partition, segments, seqs[h:],
                                   users[h:], segs[h:], ops[h:], attrs[h:] if attrs else None))

    def _dead_letters(self, batch_id: str, chunk: RowChunk) -> int:
        for bad in chunk.rejects:
            self.out.producer.send(DEAD_LETTER, 0, encode("DeadLetter", {
                "batch_id": batch_id, "file": bad.file, "row": bad.row, "reason": bad.reason,
                "raw": bad.raw[:RAW_LIMIT]}))
        return len(chunk.rejects)

    def _end_markers(self, batch_id: str, mode: str, counts: list[int], rows: int,
                     segments: list[str]) -> None:
        for partition, count in enumerate(counts):
            self.out.producer.send(ROWS, partition, encode("EndMarker", {
                "batch_id": batch_id, "partition": partition, "count": count, "total": rows,
                "mode": mode, "segments": segments}))
            self.out.flush()  # one by one, so that a crash can fall between end markers
            crash_point("import.end_marker")


def _picker(index: list[int]) -> Callable[[list[Any]], list[Any]]:
    """A function taking the elements at `index` from a list, in order."""
    if not index:
        return lambda _values: []
    if len(index) == 1:
        return lambda values: [values[index[0]]]
    get = itemgetter(*index)
    return lambda values: list(get(values))

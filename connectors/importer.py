"""The file importer: validates a file into a local spool, then publishes it.

1. Checksum the file (a pipe or standard input is first copied to a local file, hashed as
   it streams). The identity of the request is that checksum plus every option that
   changes the result (segment, mode, format, delimiter); the batch id derives from it
   unless given.
2. Ask the batch table whether the batch exists: the same request again changes nothing;
   another file, or the same file with other options, under an existing explicit batch id
   is refused, naming what differs; a batch whose import was cut short is resumed (rows the
   processor already holds are skipped there by seq).
3. Read, validate and partition every row (murmur2 of user_id, as Kafka's producer would),
   packing each partition's rows into messages in the spool; bad rows go to the dead-letter
   topic. Past the error budget the batch fails here, before any row is published.
4. Publish the spool, record `published` with the per-partition counts, then write one END
   MARKER to every partition.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectors.error_budget import ErrorBudget
from connectors.readers import file_checksum, read_chunks, resolve_format
from connectors.rows import MODES, InputFileError, RowChunk
from connectors.s3_input import ObjectStream, is_s3_url, object_name
from connectors.spool import Spool, spool_path, spool_stream
from processors.events import batch_event
from processors.pipeline_state import FAILED, PUBLISHED, SUBMITTED, BatchStatus, PipelineState
from streams.faults import crash_point
from streams.outputs import OutputWriter
from streams.state.snapshots import SnapshotStore
from streams.state.table_reader import read_table
from topics import attributes
from topics.codec import encode
from topics.columns import write_columns
from topics.log import Log
from topics.partitioner import KAFKA_SEED
from topics.spec import DEAD_LETTER, ROWS

from murmurhash2 import murmurhash2  # isort: skip

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STDIN = "-"
STDIN_NAME = "<stdin>"
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
    delimiter: str | None = None
    max_rejects: ErrorBudget = field(default_factory=lambda: ErrorBudget(fraction=0.01))
    sinks: tuple[str, ...] = ("s3", "warehouse")
    message_rows: int = 5000

    def identity(self) -> dict[str, str]:
        """The options that change what a batch does, as they are resolved: with the
        content's checksum, the identity of the request."""
        if self.path == STDIN and self.fmt is None:
            raise ValueError("reading standard input (-) needs --format: csv, tsv, jsonl or "
                             "parquet")
        kind, delimiter = resolve_format(self.path, self.fmt, self.delimiter)
        return {"format": kind, "delimiter": delimiter, "mode": self.mode,
                "segment": (self.segment or "").strip()}


def derived_batch_id(checksum: str, identity: dict[str, str]) -> str:
    request = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "b-" + hashlib.sha256(f"{checksum}\n{request}".encode()).hexdigest()[:20]


def _differences(status: BatchStatus, identity: dict[str, str]) -> list[str]:
    """The options in which a request differs from the batch's first one (batches from
    before requests were recorded hold only their mode)."""
    before = status.request or {"mode": status.mode}
    return [key for key in sorted(before) if before.get(key) != identity.get(key)]


def _is_pipe(path: str) -> bool:
    if path == STDIN:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # the reader names the problem
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


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
    # segment -> (add rows, remove rows) of this import (empty when nothing was read)
    segment_ops: dict[str, tuple[int, int]] = field(default_factory=dict)


def now_ms() -> int:
    return int(time.time() * 1000)


class Importer:
    def __init__(self, log: Log, spool_dir: Path,
                 progress: Callable[[int], None] | None = None,
                 on_input_bytes: Callable[[int], None] | None = None,
                 snapshots: SnapshotStore | None = None):
        self.log = log
        self.spool_dir = spool_dir
        self.snapshots = snapshots  # of the batch table (its changelog may have expired)
        self.progress = progress or (lambda rows: None)
        # Bytes copied so far from a pipe; called with 0 before the first byte arrives.
        self.on_input_bytes = on_input_bytes or (lambda size: None)
        self.out = OutputWriter(log, log.producer())
        self.partitions = len(log.partitions(ROWS))

    def run(self, req: ImportRequest) -> ImportResult:
        started = time.monotonic()
        if req.mode not in MODES:
            raise ValueError(f"--mode {req.mode!r}: expected one of {', '.join(MODES)}")
        if req.batch_id is not None and not BATCH_ID.match(req.batch_id):
            raise ValueError(f"--batch-id {req.batch_id!r}: expected 1-128 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
        identity = req.identity()
        if is_s3_url(req.path):
            path, checksum = self._copy_object(req.path)
            try:
                result = self._run(req, str(path), req.path, checksum, identity)
            finally:
                path.unlink(missing_ok=True)
        elif not _is_pipe(req.path):
            result = self._run(req, req.path, req.path, file_checksum(req.path), identity)
        else:
            path, checksum = self._copy_pipe(req.path)
            try:
                result = self._run(req, str(path), _name(req.path), checksum, identity)
            finally:
                path.unlink(missing_ok=True)
        result.seconds = time.monotonic() - started
        return result

    def _copy_object(self, url: str) -> tuple[Path, str]:
        """An S3 object streamed into the spool, hashed from its bytes as they arrive."""
        self.on_input_bytes(0)
        with ObjectStream(url) as body:
            return spool_stream(body, self.spool_dir, self.on_input_bytes,  # type: ignore[arg-type]
                                name=object_name(url))

    def _copy_pipe(self, path: str) -> tuple[Path, str]:
        self.on_input_bytes(0)
        if path == STDIN:
            return spool_stream(sys.stdin.buffer, self.spool_dir, self.on_input_bytes)
        with open(path, "rb") as pipe:  # a FIFO: blocks until a writer opens it
            return spool_stream(pipe, self.spool_dir, self.on_input_bytes)

    def _run(self, req: ImportRequest, path: str, name: str, checksum: str,
             identity: dict[str, str]) -> ImportResult:
        if name == STDIN_NAME and os.path.getsize(path) == 0:
            raise InputFileError(f"{STDIN_NAME}: no data rows; standard input closed before "
                                 "any data (expected a header line and rows)")
        batch_id = req.batch_id or derived_batch_id(checksum, identity)
        status: BatchStatus | None = read_table(self.log, PipelineState(), "batches",
                                                    self.snapshots).get(batch_id)
        if status is not None and status.checksum != checksum:
            raise ImportRefused(
                f"batch id {batch_id} already names another file ({status.source}, sha256 "
                f"{status.checksum[:12]}...); {name} has sha256 {checksum[:12]}...: "
                "choose another --batch-id")
        differs = [] if status is None else _differences(status, identity)
        if status is not None and differs:
            before = status.request or {"mode": status.mode}
            raise ImportRefused(
                f"batch id {batch_id} was submitted with the same file but other options: "
                + ", ".join(f"{key} {before.get(key)!r} then, {identity.get(key)!r} now"
                            for key in differs)
                + "; the same file with other options is another batch: leave out "
                "--batch-id, or choose another")
        if status is not None and status.status not in (SUBMITTED, PUBLISHED):
            outcome = "previously_failed" if status.status == FAILED else "duplicate"
            return ImportResult(batch_id, checksum, outcome, status.rows, status.rejected,
                                list(status.partition_counts), status.error)
        if status is not None and status.status == PUBLISHED:
            # Rows and counts are all on the topic; only end markers may be missing.
            self._end_markers(batch_id, req.mode, list(status.partition_counts), status.rows,
                              list(status.segments))
            return ImportResult(batch_id, checksum, "resumed", status.rows, status.rejected,
                                list(status.partition_counts))
        return self._import(req, path, name, batch_id, checksum, identity,
                            submit=status is None)

    def _import(self, req: ImportRequest, path: str, name: str, batch_id: str, checksum: str,
                identity: dict[str, str], submit: bool) -> ImportResult:
        chunks = read_chunks(path, segment=req.segment, mode=req.mode, fmt=req.fmt,
                             delimiter=req.delimiter, name=name)
        # Whole-file problems raise in the first chunks, before anything is sent.
        head: list[RowChunk] = []
        for chunk in chunks:
            head.append(chunk)
            if len(chunk) or chunk.rejects:
                break
        else:
            raise InputFileError(f"{name}: no data rows; expected at least one row after "
                                 "the header")
        counts = [0] * self.partitions
        rejected = 0
        segments: set[str] = set()
        ops: Counter[tuple[str, str]] = Counter()
        # The spool exists from before `submitted` until after `published`: while it does
        # and its process lives, the import is in progress (else `status` says interrupted).
        with Spool(spool_path(self.spool_dir, batch_id)) as spool:
            if submit:
                self.out.send(batch_event(batch_id, "submitted", now_ms(), source=name,
                                          checksum=checksum, mode=req.mode,
                                          sinks=list(req.sinks),
                                          request=json.dumps(identity, sort_keys=True)))
                self.out.flush()
            try:
                for chunk in chain(head, chunks):
                    rejected += self._dead_letters(batch_id, chunk)
                    rejected += self._spool_chunk(spool, batch_id, req, name, chunk, counts,
                                                  segments)
                    ops.update(zip(chunk.segment_ids, chunk.ops, strict=True))
                    self.progress(sum(counts) + rejected)
            except InputFileError as exc:  # found mid-file (a corrupt page, a quote)
                self.out.send(batch_event(batch_id, "failed", now_ms(), step="import",
                                          error=str(exc)))
                self.out.flush()
                raise
            spool.finish()
            rows = sum(counts)
            self.out.flush()  # dead letters
            if req.max_rejects.exceeded(rejected, rows + rejected) or rows == 0:
                error = (f"{name}: {rejected} of {rows + rejected} rows rejected, over the "
                         f"error budget of {req.max_rejects}; see topic {DEAD_LETTER}")
                self.out.send(batch_event(batch_id, "failed", now_ms(), step="import",
                                          error=error, rows=rows, rejected=rejected))
                self.out.flush()
                return ImportResult(batch_id, checksum, "failed", rows, rejected, counts, error,
                                    segment_ops=_per_segment(ops))
            producer = self.out.producer
            # Ctrl-C waits for the rows and the `published` event (seconds at most): a
            # batch is either not published or published whole.
            with _sigint_deferred():
                for i, (partition, value) in enumerate(spool, start=1):
                    producer.send(ROWS, partition, value)
                    if i % PUBLISH_FLUSH_EVERY == 0:  # bounded memory in the producer
                        producer.flush()
                        crash_point("import.publishing")
                producer.flush()
                self.out.send(batch_event(batch_id, "published", now_ms(), rows=rows,
                                          rejected=rejected, partition_counts=counts,
                                          segments=sorted(segments)))
                self.out.flush()
        crash_point("import.before_end_markers")
        self._end_markers(batch_id, req.mode, counts, rows, sorted(segments))
        return ImportResult(batch_id, checksum, "published", rows, rejected, counts,
                            segment_ops=_per_segment(ops))

    def _spool_chunk(self, spool: Spool, batch_id: str, req: ImportRequest, name: str,
                     chunk: RowChunk, counts: list[int], segments: set[str]) -> int:
        """Spools the chunk's rows as messages per partition, adding their segments to
        `segments`; returns the rows rejected for being too big for a message on their own
        (sent to the dead-letter topic)."""
        n, spooled = self.partitions, 0
        # Typed columns once per chunk (only files with attributes), then rows per partition.
        table = (attributes.from_dicts(chunk.attributes, chunk.attribute_types)
                 if chunk.attributes is not None else None)
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
            attrs = attributes.take(table, rows_of[partition]) if table is not None else None
            for start in range(0, len(seqs), step):
                end = start + step
                spooled_here = self._spool_rows(
                    spool, batch_id, req, name, partition, segments, seqs[start:end],
                    users[start:end],
                    segs[start:end], ops[start:end],
                    attrs.slice(start, step) if attrs is not None else None)
                counts[partition] += spooled_here
                spooled += spooled_here
        return len(chunk) - spooled

    def _spool_rows(self, spool: Spool, batch_id: str, req: ImportRequest, name: str,
                    partition: int, segments: set[str], seqs: list[int], users: list[str],
                    segs: list[str], ops: list[str],
                    attrs: pa.Table | None) -> int:
        """The rows as one message, or in halves while that is over the log's message
        limit; a single row over it is a bad row. Returns the rows spooled."""
        value = encode("AudienceRows", {"batch_id": batch_id, "mode": req.mode,
                                        **write_columns(seqs, users, segs, ops),
                                        attributes.FIELD: attributes.pack(attrs)})
        limit = self.log.max_message_bytes
        if len(value) <= limit:
            spool.add(partition, value)
            segments.update(segs)  # the segments a replace batch names: of rows it holds
            return len(seqs)
        if len(seqs) == 1:
            keys = f", attributes {sorted(attrs.column_names)}" if attrs is not None else ""
            self.out.producer.send(DEAD_LETTER, 0, encode("DeadLetter", {
                "batch_id": batch_id, "file": name, "row": seqs[0],
                "reason": f"row is {len(value):,} bytes as a message, over the log's "
                          f"{limit:,}-byte message limit",
                "raw": f"user_id={users[0]!r}, segment_id={segs[0]!r}{keys}"[:RAW_LIMIT]}))
            return 0
        h = len(seqs) // 2
        return (self._spool_rows(spool, batch_id, req, name, partition, segments, seqs[:h],
                                 users[:h], segs[:h], ops[:h], _rows(attrs, 0, h))
                + self._spool_rows(spool, batch_id, req, name, partition, segments, seqs[h:],
                                   users[h:], segs[h:], ops[h:], _rows(attrs, h, len(seqs))))

    def _dead_letters(self, batch_id: str, chunk: RowChunk) -> int:
        for bad in chunk.rejects:
            self.out.producer.send(DEAD_LETTER, 0, encode("DeadLetter", {
                "batch_id": batch_id, "file": bad.file, "row": bad.row,
                "reason": bad.reason, "raw": bad.raw[:RAW_LIMIT], "line": bad.line}))
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


def _name(path: str) -> str:
    return STDIN_NAME if path == STDIN else path


def _per_segment(ops: Counter[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    segments = sorted({segment for segment, _op in ops})
    return {s: (ops[(s, "add")], ops[(s, "remove")]) for s in segments}


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """SIGINT inside the block is held back and raised as KeyboardInterrupt after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _rows(table: pa.Table | None, start: int, end: int) -> pa.Table | None:
    return None if table is None else table.slice(start, end - start)

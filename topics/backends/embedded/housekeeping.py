"""The embedded log's own housekeeping, as a Kafka broker does it for a topic's config.

cleanup "delete": whole segments are deleted, oldest first, while their newest message is
older than `retention_ms` or while the partition without them is still at least
`retention_bytes`. A segment's age is its file's modification time, which is the moment
its last frame was written (Kafka before 0.10.1 did the same; the frame timestamps would
need a scan of the segment). The active segment expires too: it is rolled first, under the
writer lock, so a frame appended meanwhile is never deleted. Size retention never deletes
the active segment.

cleanup "compact": every closed segment is rewritten keeping the last record per key
(keyless records, which the producer refuses but an older writer may have left, are kept),
the survivors at their positions; a segment left empty is deleted. The active segment is
neither read nor rewritten (Kafka's cleaner also stops at it), so a key's record in it
does not yet supersede older ones. A pass runs when a closed segment has not been compacted
yet. Deleted records (tombstones) do not exist here: values are never null.

One housekeeper at a time per partition (a non-blocking flock of `<n>.clean.lock`; a busy
partition is skipped). The slow part of compaction (reading and writing) holds only that
lock; putting a rewrite in place holds the writer lock for a rename.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from topics.backends.embedded.partition_file import PartitionFile
from topics.backends.embedded.segment import COMPACTED, RAW, compacted_record, encode_frame

WRITE_CHUNK = 1 << 20


@contextmanager
def _cleaner_lock(pf: PartitionFile) -> Iterator[bool]:
    fd = os.open(pf.path.with_suffix(".clean.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _tmp_prefix(pf: PartitionFile) -> str:
    return f".{pf.partition}."


def housekeep_partition(pf: PartitionFile, config: dict[str, Any], now_ms: int
                        ) -> dict[str, list[dict[str, Any]]]:
    """Applies `config` (a topic's cleanup, retention_ms, retention_bytes) to one partition.
    Returns what it removed: {"deleted": [...], "compacted": [...]}, one dict a segment."""
    out: dict[str, list[dict[str, Any]]] = {"deleted": [], "compacted": []}
    with _cleaner_lock(pf) as got:
        if not got:
            return out  # another process is housekeeping this partition
        for leftover in pf.dir.glob(_tmp_prefix(pf) + "*.tmp"):  # a cleaner that crashed
            leftover.unlink(missing_ok=True)
        if config.get("cleanup") == "compact":
            _compact(pf, out)
        else:
            _retain(pf, config.get("retention_ms"), config.get("retention_bytes"), now_ms, out)
    return out


def _retain(pf: PartitionFile, retention_ms: int | None, retention_bytes: int | None,
            now_ms: int, out: dict[str, list[dict[str, Any]]]) -> None:
    def delete(base: int, reason: str) -> None:
        freed = pf.delete_segment(base)
        out["deleted"].append({"base": base, "bytes": freed, "reason": reason})

    if retention_ms is not None:
        cutoff = now_ms - retention_ms
        for seg in pf.segments():
            if seg.mtime_ms >= cutoff:
                break
            if seg.last and pf.roll(if_older_than_ms=cutoff) is None:
                break  # empty, or written to a moment ago
            delete(seg.base, "retention_ms")
    if retention_bytes is not None:
        segments = pf.segments()
        total = sum(seg.bytes for seg in segments)
        for seg in segments:
            if seg.last or total - seg.bytes < retention_bytes:
                break
            delete(seg.base, "retention_bytes")
            total -= seg.bytes


def _compact(pf: PartitionFile, out: dict[str, list[dict[str, Any]]]) -> None:
    closed = [seg for seg in pf.segments() if not seg.last]
    if not any(seg.kind == RAW for seg in closed):
        return  # nothing new since the last pass
    latest: dict[bytes, int] = {}
    for seg in closed:
        for position, _ts, key, _value, _next in pf.segment_frames(seg.base):
            if key is not None:
                latest[key] = position
    for seg in closed:
        tmp = pf.dir / f"{_tmp_prefix(pf)}{seg.base:020d}.{COMPACTED}.{os.getpid()}.tmp"
        kept = removed = 0
        try:
            with open(tmp, "wb") as f:
                buf: list[bytes] = []
                buffered = 0
                for position, ts, key, value, _next in pf.segment_frames(seg.base):
                    if key is not None and latest[key] != position:
                        removed += 1
                        continue
                    kept += 1
                    record = compacted_record(position, encode_frame(value, key, ts))
                    buf.append(record)
                    buffered += len(record)
                    if buffered >= WRITE_CHUNK:
                        f.write(b"".join(buf))
                        buf, buffered = [], 0
                f.write(b"".join(buf))
                f.flush()
                # Always synced: the raw segment it replaces is deleted right after.
                os.fsync(f.fileno())
            if not removed and seg.kind == COMPACTED:
                tmp.unlink()
                continue
            if not kept:
                tmp.unlink()
                pf.delete_segment(seg.base)
                out["compacted"].append({"base": seg.base, "removed": removed, "kept": 0,
                                         "bytes_before": seg.bytes, "bytes_after": 0})
                continue
            after = tmp.stat().st_size
            pf.install_compacted(seg.base, tmp)
            out["compacted"].append({"base": seg.base, "removed": removed, "kept": kept,
                                     "bytes_before": seg.bytes, "bytes_after": after})
        finally:
            tmp.unlink(missing_ok=True)

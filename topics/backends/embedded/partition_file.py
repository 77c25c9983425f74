"""One partition of the embedded log: a run of segment files of checksummed frames.

The frame format and the segment files are described in segment.py. A message's position is
a byte offset in the partition's history: sparse, monotonic, never reused, and a direct
seek. The last segment is appended to; past `segment_bytes` the next append rolls a new one
whose base is the old one's end. Housekeeping (housekeeping.py) deletes whole old segments
(retention) or rewrites closed ones (compaction); positions of what remains never change.

Writers serialise on an flock of `<n>.lock`, so several processes (importer, workers) can
append to one partition. A frame is acknowledged once its write() returned: the page cache
outlives a SIGKILLed process. `fsync=True` also survives power loss, at a cost.
A torn tail (a writer killed mid-write) is cut off by the next writer, or by a reader that
finds the tail stuck and the lock free.

Every change to the set of segment files (roll, delete, compacted rewrite put in place)
happens under that lock, and so does every listing of them, so a listing is never half
of a change. A handle notices a change without listing: the file it believes last has a
successor (a file named by its end) or is unlinked (st_nlink 0), or a segment it reads
is unlinked. Readers hold segments open, so one deleted under a reader stays readable
through its descriptor until the reader notices and moves on, which closes it and frees
the space.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from topics.backends.embedded.segment import (
    COMPACTED,
    HEADER,
    NO_KEY,
    RAW,
    READ_AHEAD,
    CompactedSegment,
    CorruptLogError,
    Frame,
    RawSegment,
    encode_frame,
    parse_name,
    segment_name,
)
from topics.spec import DEFAULT_SEGMENT_BYTES

__all__ = ["HEADER", "NO_KEY", "READ_AHEAD", "CorruptLogError", "PartitionFile",
           "SegmentInfo", "encode_frame"]

log_ = logging.getLogger(__name__)

# Descriptors kept open on closed segments besides the one being read (the active one is
# always open): a descriptor on a deleted segment holds its disk space.
MAX_OPEN_CLOSED = 2


@dataclass
class _Entry:
    base: int
    kind: str
    path: Path
    ino: int
    seg: RawSegment | CompactedSegment | None = None  # open lazily


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    base: int
    kind: str  # "log" (raw) or "compacted"
    path: Path
    bytes: int
    mtime_ms: int  # the time of its last append: its newest message's age
    last: bool  # the active segment, appended to


class PartitionFile:
    def __init__(self, path: Path, fsync: bool = False,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES):
        self.path = path  # `<n>.log`: the first segment's name; it names the partition
        self.dir = path.parent
        self.partition = int(path.stem)
        self.lock_path = path.with_suffix(".lock")
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.rolls = 0  # segments this handle rolled (the producer housekeeps after one)
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._entries: list[_Entry] = []
        self._bases: list[int] = []
        self._open_closed: OrderedDict[int, _Entry] = OrderedDict()
        self._clean_end: int | None = None  # end of the frames this writer has verified
        self._warned: int | None = None
        self._scan()

    def close(self) -> None:
        with self._mutex:
            for entry in self._entries:
                self._close_entry(entry)
            self._open_closed.clear()

    # -- the writer lock and the segment listing --------------------------------------------
    @contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        """The partition's writer flock; re-entrant within this handle."""
        with self._mutex:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield True
                finally:
                    self._lock_depth -= 1
                return
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    yield False
                    return
                self._lock_depth = 1
                try:
                    yield True
                finally:
                    self._lock_depth = 0
            finally:
                os.close(fd)  # closing drops the lock

    def _scan(self) -> None:
        """Lists the segment files (under the lock: a listing never sees half a change)."""
        with self._locked():
            found: dict[int, tuple[str, Path, int]] = {}
            with os.scandir(self.dir) as it:
                for item in it:
                    parsed = parse_name(item.name)
                    if parsed is None or parsed[0] != self.partition:
                        continue
                    _p, base, kind = parsed
                    if base in found:  # a raw file left beside its compacted rewrite by a
                        # crash between the two steps of install_compacted: finish the job
                        (Path(item.path) if kind == RAW else found[base][1]).unlink(
                            missing_ok=True)
                        if kind == RAW:
                            continue
                    found[base] = (kind, Path(item.path), item.inode())
            if not found:  # a new partition
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
                found[0] = (RAW, self.path, os.fstat(fd).st_ino)
                os.close(fd)
            old = {(e.base, e.kind, e.ino): e for e in self._entries}
            entries = []
            for base in sorted(found):
                kind, path, ino = found[base]
                entries.append(old.pop((base, kind, ino), None) or _Entry(base, kind, path, ino))
            for gone in old.values():
                self._close_entry(gone)
            self._entries = entries
            self._bases = [e.base for e in entries]
            self._track_open()

    def _track_open(self) -> None:
        """Keeps at most MAX_OPEN_CLOSED descriptors open on closed segments."""
        for base in [b for b, e in self._open_closed.items() if e.seg is None]:
            del self._open_closed[base]
        for entry in self._entries[:-1]:
            if entry.seg is not None and entry.base not in self._open_closed:
                self._open_closed[entry.base] = entry
        while len(self._open_closed) > MAX_OPEN_CLOSED:
            _base, evicted = self._open_closed.popitem(last=False)
            if evicted.seg is not None:
                evicted.seg.close()
                evicted.seg = None

    def _close_entry(self, entry: _Entry) -> None:
        if entry.seg is not None:
            entry.seg.close()
            entry.seg = None
        self._open_closed.pop(entry.base, None)

    def _open(self, entry: _Entry) -> RawSegment | CompactedSegment | None:
        """The entry's segment, opened if need be; None if its file is gone (rescan)."""
        if entry.seg is None:
            try:
                if entry.kind == RAW:
                    fd = os.open(entry.path, os.O_RDWR | os.O_APPEND)
                    entry.seg = RawSegment(entry.path, entry.base, fd)
                else:
                    fd = os.open(entry.path, os.O_RDONLY)
                    entry.seg = CompactedSegment(entry.path, entry.base, fd)
            except FileNotFoundError:
                return None
            if os.fstat(fd).st_ino != entry.ino:  # replaced since the listing
                self._close_entry(entry)
                return None
        seg = entry.seg
        if entry is not self._entries[-1]:
            self._open_closed[entry.base] = entry
            self._open_closed.move_to_end(entry.base)
            self._track_open()
        return seg

    def _active(self) -> tuple[RawSegment, os.stat_result]:
        """The last segment and its stat, after catching up with rolls and deletions made
        through other handles."""
        while True:
            entry = self._entries[-1]
            seg = self._open(entry)
            if isinstance(seg, CompactedSegment):
                raise CorruptLogError(f"{entry.path}: the last segment of a partition must "
                                      "be a raw one (compaction rewrites closed segments)")
            if seg is not None:
                st = os.fstat(seg.fd)
                # A roll names the next segment by this one's end (an empty one never rolls).
                successor = self.dir / segment_name(self.partition, seg.base + st.st_size, RAW)
                if st.st_nlink and (not st.st_size or not successor.exists()):
                    return seg, st
            self._scan()

    def _fsync_dir(self) -> None:
        if self.fsync:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- writing ----------------------------------------------------------------------------
    def size(self) -> int:
        """The end of the partition: the position the next appended frame gets (once any
        torn tail is cut)."""
        with self._mutex:
            seg, st = self._active()
            return seg.base + st.st_size

    def append(self, frames: list[bytes]) -> list[int]:
        """Appends frames atomically with respect to other writers; returns their positions."""
        with self._locked():
            start = self._repair_tail()
            seg = self._entries[-1].seg  # verified by _repair_tail
            assert isinstance(seg, RawSegment)
            limit = seg.base + self.segment_bytes
            positions, pos, first = [], start, 0
            for i, frame in enumerate(frames):
                if pos + len(frame) > limit and pos > seg.base:
                    # Rolls between frames, as Kafka between batches: a segment is never
                    # empty, and a frame bigger than a segment gets one of its own.
                    self._write(seg, frames[first:i])
                    seg = self._roll(pos)
                    limit, first = pos + self.segment_bytes, i
                positions.append(pos)
                pos += len(frame)
            self._write(seg, frames[first:])
            self._clean_end = pos
        return positions

    def _write(self, seg: RawSegment, frames: list[bytes]) -> None:
        data = b"".join(frames)
        written = os.write(seg.fd, data)
        if written != len(data):
            raise OSError(f"{seg.path}: short write ({written} of {len(data)} bytes)")
        if self.fsync:
            os.fsync(seg.fd)

    def _roll(self, start: int) -> RawSegment:
        """Under the lock, with the tail verified up to `start`: a new last segment there."""
        path = self.dir / segment_name(self.partition, start, RAW)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._fsync_dir()
        self.rolls += 1
        seg = RawSegment(path, start, fd)
        self._close_entry(self._entries[-1])  # a writer has no use for a closed segment
        self._entries.append(_Entry(start, RAW, path, os.fstat(fd).st_ino, seg))
        self._bases.append(start)
        return seg

    def roll(self, if_older_than_ms: int | None = None) -> int | None:
        """Closes the last segment if it holds anything and, given `if_older_than_ms`, was
        last appended to before then (checked under the lock, so a frame appended meanwhile
        keeps it open). Returns the closed segment's base, or None if it stays open."""
        with self._locked():
            start = self._repair_tail()
            seg, st = self._active()
            if start == seg.base:
                return None
            if if_older_than_ms is not None and st.st_mtime_ns // 1_000_000 >= if_older_than_ms:
                return None
            self._roll(start)
            return seg.base

    def repair_if_idle(self) -> None:
        """Cuts a torn tail when no writer is active (called by readers stuck on a tail)."""
        with self._locked(blocking=False) as got:
            if got:
                self._repair_tail()

    def _repair_tail(self) -> int:
        """Under the writer lock: verify frames past the last known clean end; truncate a
        torn tail. Returns the clean end (a position)."""
        seg, st = self._active()
        size = st.st_size
        pos = 0
        if self._clean_end is not None and self._clean_end >= seg.base:
            pos = self._clean_end - seg.base
        if pos > size:  # the file shrank under us (cut by hand): verify from the start
            pos = 0
        if pos == size:
            return seg.base + pos
        for _position, _ts, _key, _value, end in seg.frames(pos, size, max_bytes=size - pos):
            pos = end - seg.base
        if pos != size:
            os.ftruncate(seg.fd, pos)
        self._clean_end = seg.base + pos
        return self._clean_end

    # -- reading ----------------------------------------------------------------------------
    def _locate(self, position: int) -> tuple[int, int]:
        """(index of the segment holding `position`, the position to read from there): a
        position before the first retained segment moves to where that segment begins."""
        i = bisect.bisect_right(self._bases, position) - 1
        if i >= 0:
            return i, position
        first = self._bases[0]
        if position > 0 and self._warned != position:
            self._warned = position  # once per position, not on every poll of an idle reader
            log_.warning("%s: position %d is no longer retained (history before %d was "
                         "deleted); reading resumes at the earliest retained message",
                         self.path, position, first)
        return 0, first

    def read(self, start: int, max_messages: int,
             max_bytes: int = READ_AHEAD) -> list[Frame]:
        """Complete frames from position `start` (a frame's position, or the end of one):
        (position, ts, key, value, next position). History that is no longer retained is
        skipped: a start before it reads from the earliest retained message."""
        out: list[Frame] = []
        with self._mutex:
            pos, budget = start, max_bytes
            while len(out) < max_messages and budget > 0:
                i, pos = self._locate(pos)
                entry = self._entries[i]
                seg = self._open(entry)
                if seg is None:
                    self._scan()
                    continue
                last = i == len(self._entries) - 1
                if isinstance(seg, RawSegment):
                    st = os.fstat(seg.fd)
                    if not st.st_nlink:  # deleted or rewritten since we listed
                        self._scan()
                        continue
                    size = st.st_size
                    if pos - seg.base < size:
                        got = list(islice(seg.frames(pos - seg.base, size, budget),
                                          max_messages - len(out)))
                        if got:
                            out.extend(got)
                            budget -= got[-1][4] - got[0][0]  # contiguous in a raw segment
                            pos = got[-1][4]
                        if pos - seg.base < size:
                            break  # a limit, or a tail being written (or torn)
                    if last:
                        if pos > seg.base and (
                                self.dir / segment_name(self.partition, pos, RAW)).exists():
                            self._scan()  # rolled through another handle: read on
                            continue
                        break
                else:
                    got = list(seg.frames(pos, max_messages - len(out), budget))
                    if got:
                        out.extend(got)
                        budget -= got[-1][4] - got[0][0]  # what it spans, gaps included
                        pos = got[-1][4]
                    if len(out) >= max_messages or budget <= 0:
                        break
                    if last:
                        break
                # Done with this closed segment: let go of it, so that deleting it frees
                # its space even if this handle never looks back.
                self._close_entry(entry)
                pos = max(pos, self._entries[i + 1].base)
        return out

    def frame_end(self, position: int) -> int:
        """The position right after the frame at `position`: where reading after it resumes.
        For a position no longer retained, the earliest retained one; for one compaction
        removed, the next record's."""
        with self._mutex:
            while True:
                i = bisect.bisect_right(self._bases, position) - 1
                if i < 0:
                    return self._locate(position)[1]
                entry = self._entries[i]
                seg = self._open(entry)
                if seg is None:
                    self._scan()
                    continue
                following = (self._entries[i + 1].base if i + 1 < len(self._entries)
                             else None)
                if isinstance(seg, RawSegment):
                    if following is not None and position - seg.base >= os.fstat(
                            seg.fd).st_size:
                        return following  # a gap left by an emptied compacted segment
                    return seg.frame_end(position)
                end = seg.frame_end(position)
                return end if end is not None else following if following is not None \
                    else position + 1

    # -- housekeeping primitives (housekeeping.py) ------------------------------------------
    def segments(self) -> list[SegmentInfo]:
        """The segments as they are now, oldest first."""
        with self._locked():
            self._scan()
            self._active()
            out = []
            for entry in self._entries:
                try:
                    st = entry.path.stat()
                except FileNotFoundError:  # cannot happen under the lock; be safe
                    continue
                out.append(SegmentInfo(entry.base, entry.kind, entry.path, st.st_size,
                                       st.st_mtime_ns // 1_000_000,
                                       entry is self._entries[-1]))
            return out

    def segment_frames(self, base: int) -> Iterator[Frame]:
        """Every frame of the closed segment starting at `base` (it never changes)."""
        with self._mutex:
            i = bisect.bisect_left(self._bases, base)
            if i >= len(self._bases) - 1 or self._bases[i] != base:
                raise ValueError(f"{self.path}: no closed segment at {base}")
            entry = self._entries[i]
        # A descriptor of its own: valid to the end even if the file is deleted meanwhile.
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            if entry.kind == RAW:
                size = os.fstat(fd).st_size
                yield from RawSegment(entry.path, base, fd).frames(0, size, max_bytes=size)
            else:
                yield from CompactedSegment(entry.path, base, fd).frames(base, 1 << 62, 1 << 62)
        finally:
            os.close(fd)

    def delete_segment(self, base: int) -> int:
        """Deletes a closed segment; returns its size in bytes (0 if it was gone)."""
        with self._locked():
            self._scan()
            if base >= self._bases[-1]:
                raise ValueError(f"{self.path}: the last segment ({base}) is never deleted")
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                return 0
            entry = self._entries[i]
            size = entry.path.stat().st_size
            entry.path.unlink()
            self._fsync_dir()
            self._scan()
            return size

    def install_compacted(self, base: int, tmp: Path) -> None:
        """Puts a compacted rewrite of the closed segment at `base` in place, atomically for
        readers (rename), then removes the raw file it replaces."""
        with self._locked():
            self._scan()
            i = bisect.bisect_left(self._bases, base)
            if i >= len(self._bases) - 1 or self._bases[i] != base:
                tmp.unlink(missing_ok=True)
                raise ValueError(f"{self.path}: no closed segment at {base}")
            old = self._entries[i]
            final = self.dir / segment_name(self.partition, base, COMPACTED)
            os.replace(tmp, final)
            if old.kind == RAW:
                old.path.unlink(missing_ok=True)
            self._fsync_dir()
            self._scan()

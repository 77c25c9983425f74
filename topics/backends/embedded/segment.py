"""Segment files of one embedded partition, and the frame format they share.

Frame: u32 value length | u32 crc32 | i64 timestamp ms | u16 key length (0xFFFF: no key)
       | key | value.  The crc covers everything after itself.

A partition is a run of segments, each covering the positions from its base to the next
segment's base. Positions are byte offsets in the partition's history: the frame at byte `o`
of a raw segment with base `b` is at position `b + o`, and a new segment's base is the
previous segment's end, so positions stay contiguous, monotonic and never reused.

    <n>.log                        the first raw segment (base 0; the old one-file layout)
    <n>.<base:020d>.log            a later raw segment: frames, appended to while it is last
    <n>.<base:020d>.compacted      a closed segment rewritten by compaction (housekeeping.py)

A compacted segment keeps only some of its frames, so it cannot derive positions from byte
offsets: each record is `u64 position | u32 crc32 of those 8 bytes | frame`, the frame
unchanged (its own crc still covers it). It is written whole to a temporary name, synced and
renamed into place, so a reader sees all of it or none of it.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path

HEADER = struct.Struct("<IIqH")
NO_KEY = 0xFFFF
READ_AHEAD = 4 << 20
COMPACT_HEADER = struct.Struct("<QI")
RAW, COMPACTED = "log", "compacted"
_NAME = re.compile(r"^(\d+)(?:\.(\d{20}))?\.(log|compacted)$")

# (position, timestamp ms, key, value, position right after this frame)
Frame = tuple[int, int, bytes | None, bytes, int]


class CorruptLogError(Exception):
    """A frame in the middle of a partition fails its checksum."""


def encode_frame(value: bytes, key: bytes | None, timestamp_ms: int) -> bytes:
    key_bytes = key or b""
    if len(key_bytes) >= NO_KEY:
        raise ValueError(f"key of {len(key_bytes)} bytes starting {key_bytes[:20]!r}: "
                         f"keys must be shorter than {NO_KEY} bytes")
    key_len = NO_KEY if key is None else len(key_bytes)
    body = struct.pack("<qH", timestamp_ms, key_len) + key_bytes + value
    return struct.pack("<II", len(value), zlib.crc32(body)) + body


def frame_length(head: bytes | memoryview, off: int = 0) -> int:
    value_len, _crc, _ts, key_len = HEADER.unpack_from(head, off)
    return HEADER.size + (0 if key_len == NO_KEY else key_len) + value_len


def segment_name(partition: int, base: int, kind: str) -> str:
    if kind == RAW and base == 0:
        return f"{partition}.log"  # the first segment keeps the old layout's name
    return f"{partition}.{base:020d}.{kind}"


def parse_name(name: str) -> tuple[int, int, str] | None:
    """(partition, base, kind) of a segment file name; None for anything else."""
    m = _NAME.match(name)
    if m is None or (m.group(2) is None and m.group(3) != RAW):
        return None
    return int(m.group(1)), int(m.group(2) or 0), m.group(3)


class RawSegment:
    """Frames at contiguous byte offsets; the last segment of a partition is appended to."""

    kind = RAW

    def __init__(self, path: Path, base: int, fd: int):
        self.path, self.base, self.fd = path, base, fd

    def close(self) -> None:
        os.close(self.fd)

    def frame_end(self, position: int) -> int:
        head = os.pread(self.fd, HEADER.size, position - self.base)
        if len(head) < HEADER.size:
            raise CorruptLogError(f"{self.path}: no frame at position {position}")
        return position + frame_length(head)

    def frames(self, pos: int, size: int, max_bytes: int = READ_AHEAD) -> Iterator[Frame]:
        """Valid frames from byte `pos` of the file, stopping at an incomplete or torn tail.
        A bad frame followed by valid ones is corruption, not a tail: CorruptLogError."""
        budget = max_bytes
        base = self.base
        while pos < size and budget > 0:
            chunk = os.pread(self.fd, min(READ_AHEAD, size - pos), pos)
            view = memoryview(chunk)
            at = base + pos  # position of chunk[0]
            off = 0
            while off + HEADER.size <= len(chunk):
                value_len, crc, ts, key_len = HEADER.unpack_from(chunk, off)
                klen = 0 if key_len == NO_KEY else key_len
                end = off + HEADER.size + klen + value_len
                if end > len(chunk):
                    break
                if zlib.crc32(view[off + 8 : end]) != crc:
                    self._check_not_corrupt(pos + off, pos + end, size)
                    return  # a tail still being written, or torn
                body = off + HEADER.size
                key = None if key_len == NO_KEY else bytes(view[body : body + klen])
                value = bytes(view[body + klen : end])
                yield at + off, ts, key, value, at + end
                budget -= end - off
                off = end
                if budget <= 0:
                    return
            if off == 0:
                if len(chunk) < size - pos:
                    # A frame larger than the read-ahead: read exactly that frame.
                    need = frame_length(chunk)
                    frame = self._whole_frame(pos, need) if pos + need <= size else None
                    if frame is not None:
                        yield frame
                        pos += need
                        budget -= need
                        continue
                    if pos + need <= size:
                        self._check_not_corrupt(pos, pos + need, size)
                return  # incomplete tail
            pos += off

    def _check_not_corrupt(self, bad: int, after: int, size: int) -> None:
        """A frame at byte `bad` failed its checksum. If a valid frame follows where it says
        it ends, the bytes in between were damaged in place: refuse to read past or cut them."""
        pos = after
        while pos + HEADER.size <= size:
            need = frame_length(os.pread(self.fd, HEADER.size, pos))
            if pos + need > size or self._whole_frame(pos, need) is None:
                return  # garbage all the way: a torn tail
            raise CorruptLogError(
                f"{self.path}: the frame at byte {bad} fails its checksum but valid frames "
                f"follow (at byte {pos}); the partition is damaged, not torn")

    def _whole_frame(self, pos: int, need: int) -> Frame | None:
        chunk = os.pread(self.fd, need, pos)
        _value_len, crc, ts, key_len = HEADER.unpack_from(chunk, 0)
        if zlib.crc32(memoryview(chunk)[8:]) != crc:
            return None
        klen = 0 if key_len == NO_KEY else key_len
        key = None if key_len == NO_KEY else chunk[HEADER.size : HEADER.size + klen]
        at = self.base + pos
        return at, ts, key, chunk[HEADER.size + klen :], at + need


def compacted_record(position: int, frame: bytes | memoryview) -> bytes:
    pos = struct.pack("<Q", position)
    return pos + struct.pack("<I", zlib.crc32(pos)) + bytes(frame)


class CompactedSegment:
    """An immutable file of (position, frame) records in position order (see the module
    docstring). Its index of positions is built on first use; the file never changes."""

    kind = COMPACTED

    def __init__(self, path: Path, base: int, fd: int):
        self.path, self.base, self.fd = path, base, fd
        self._positions: array[int] | None = None
        self._offsets: array[int] | None = None  # file offset of each record, plus the size

    def close(self) -> None:
        os.close(self.fd)

    def _index(self) -> tuple[array[int], array[int]]:
        if self._positions is None or self._offsets is None:
            positions, offsets = array("q"), array("q")
            size = os.fstat(self.fd).st_size
            off = 0
            while off < size:
                head = os.pread(self.fd, COMPACT_HEADER.size + HEADER.size, off)
                if len(head) < COMPACT_HEADER.size + HEADER.size:
                    raise CorruptLogError(f"{self.path}: truncated record at byte {off}")
                position, crc = COMPACT_HEADER.unpack_from(head, 0)
                if zlib.crc32(head[:8]) != crc or (positions and position <= positions[-1]):
                    raise CorruptLogError(f"{self.path}: bad record position at byte {off}")
                positions.append(position)
                offsets.append(off)
                off += COMPACT_HEADER.size + frame_length(head, COMPACT_HEADER.size)
            if off != size:
                raise CorruptLogError(f"{self.path}: truncated record at byte {offsets[-1]}")
            offsets.append(size)
            self._positions, self._offsets = positions, offsets
        return self._positions, self._offsets

    def first_at_or_after(self, position: int) -> int | None:
        """The position of the first record at or after `position`; None if there is none."""
        positions, _offsets = self._index()
        i = bisect.bisect_left(positions, position)
        return positions[i] if i < len(positions) else None

    def frame_end(self, position: int) -> int | None:
        """The end of the frame at `position`; for a position compaction removed, the next
        record's position (reading resumes there). None when no record follows."""
        positions, offsets = self._index()
        i = bisect.bisect_left(positions, position)
        if i == len(positions):
            return None
        if positions[i] != position:
            return positions[i]
        head = os.pread(self.fd, HEADER.size, offsets[i] + COMPACT_HEADER.size)
        return position + frame_length(head)

    def frames(self, start: int, max_messages: int, max_bytes: int) -> Iterator[Frame]:
        """Records at or after position `start`, their checksums verified."""
        positions, offsets = self._index()
        i = bisect.bisect_left(positions, start)
        chunk, chunk_at = b"", 0
        budget = max_bytes
        while i < len(positions) and max_messages > 0 and budget > 0:
            begin, end = offsets[i], offsets[i + 1]
            if end > chunk_at + len(chunk) or begin < chunk_at:
                chunk_at = begin
                chunk = os.pread(self.fd, max(min(READ_AHEAD, offsets[-1] - begin),
                                              end - begin), begin)
            off = begin - chunk_at + COMPACT_HEADER.size
            value_len, crc, ts, key_len = HEADER.unpack_from(chunk, off)
            klen = 0 if key_len == NO_KEY else key_len
            frame_end = off + HEADER.size + klen + value_len
            view = memoryview(chunk)
            if frame_end != end - chunk_at or zlib.crc32(view[off + 8 : frame_end]) != crc:
                raise CorruptLogError(f"{self.path}: the record at byte {begin} fails its "
                                      "checksum")
            body = off + HEADER.size
            key = None if key_len == NO_KEY else bytes(view[body : body + klen])
            position = positions[i]
            yield (position, ts, key, bytes(view[body + klen : frame_end]),
                   position + frame_end - off)
            budget -= end - begin
            max_messages -= 1
            i += 1

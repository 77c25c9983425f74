"""One partition of the embedded log: an append-only file of checksummed frames.

Frame: u32 value length | u32 crc32 | i64 timestamp ms | u16 key length (0xFFFF: no key)
       | key | value.  The crc covers everything after itself.
A message's position is the byte offset of its frame: sparse, monotonic, and a direct seek.

Writers serialise on an flock of `<n>.lock`, so several processes (importer, workers) can
append to one partition. A frame is acknowledged once its write() returned: the page cache
outlives a SIGKILLed process. `fsync=True` also survives power loss, at a cost.
A torn tail (a writer killed mid-write) is cut off by the next writer, or by a reader that
finds the tail stuck and the lock free.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HEADER = struct.Struct("<IIqH")
NO_KEY = 0xFFFF
READ_AHEAD = 4 << 20


class CorruptLogError(Exception):
    """A frame in the middle of a partition file fails its checksum."""


def encode_frame(value: bytes, key: bytes | None, timestamp_ms: int) -> bytes:
    key_bytes = key or b""
    if len(key_bytes) >= NO_KEY:
        raise ValueError(f"key of {len(key_bytes)} bytes starting {key_bytes[:20]!r}: "
                         f"keys must be shorter than {NO_KEY} bytes")
    key_len = NO_KEY if key is None else len(key_bytes)
    body = struct.pack("<qH", timestamp_ms, key_len) + key_bytes + value
    return struct.pack("<II", len(value), zlib.crc32(body)) + body


class PartitionFile:
    def __init__(self, path: Path, fsync: bool = False):
        self.path = path
        self.lock_path = path.with_suffix(".lock")
        self.fsync = fsync
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._clean_end: int | None = None  # end of the frames this writer has verified

    def close(self) -> None:
        os.close(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    @contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing drops the lock

    def append(self, frames: list[bytes]) -> list[int]:
        """Appends frames atomically with respect to other writers; returns their positions."""
        data = b"".join(frames)
        with self._locked():
            start = self._repair_tail()
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
            if self.fsync:
                os.fsync(self._fd)
            self._clean_end = start + len(data)
        positions, pos = [], start
        for frame in frames:
            positions.append(pos)
            pos += len(frame)
        return positions

    def repair_if_idle(self) -> None:
        """Cuts a torn tail when no writer is active (called by readers stuck on a tail)."""
        with self._locked(blocking=False) as got:
            if got:
                self._repair_tail()

    def _repair_tail(self) -> int:
        """Under the writer lock: verify frames past the last known clean end; truncate a
        torn tail. Returns the clean end."""
        size = self.size()
        pos = self._clean_end if self._clean_end is not None else 0
        if pos > size:  # the file shrank under us (cut by hand): verify from the start
            pos = 0
        if pos == size:
            return pos
        for _position, _ts, _key, _value, end in self._frames(pos, size, max_bytes=size - pos):
            pos = end
        if pos != size:
            os.ftruncate(self._fd, pos)
        self._clean_end = pos
        return pos

    def read(
        self, start: int, max_messages: int, max_bytes: int = READ_AHEAD
    ) -> list[tuple[int, int, bytes | None, bytes, int]]:
        """Complete frames from byte `start`: (position, ts, key, value, next position)."""
        size = self.size()
        out = []
        for frame in self._frames(start, size, max_bytes=max_bytes):
            out.append(frame)
            if len(out) >= max_messages:
                break
        return out

    def frame_end(self, position: int) -> int:
        """The position right after the frame at `position`."""
        head = os.pread(self._fd, HEADER.size, position)
        if len(head) < HEADER.size:
            raise CorruptLogError(f"{self.path}: no frame at position {position}")
        value_len, _crc, _ts, key_len = HEADER.unpack(head)
        return position + HEADER.size + (0 if key_len == NO_KEY else key_len) + value_len

    def _frames(
        self, pos: int, size: int, max_bytes: int = READ_AHEAD
    ) -> Iterator[tuple[int, int, bytes | None, bytes, int]]:
        """Valid frames from `pos`, stopping at an incomplete or torn tail. A bad frame
        followed by valid ones is corruption, not a tail: that raises CorruptLogError."""
        budget = max_bytes
        while pos < size and budget > 0:
            chunk = os.pread(self._fd, min(READ_AHEAD, size - pos), pos)
            view = memoryview(chunk)
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
                yield pos + off, ts, key, value, pos + end
                budget -= end - off
                off = end
                if budget <= 0:
                    return
            if off == 0:
                if len(chunk) < size - pos:
                    # A frame larger than the read-ahead: read exactly that frame.
                    value_len, _crc, _ts, key_len = HEADER.unpack_from(chunk, 0)
                    need = HEADER.size + (0 if key_len == NO_KEY else key_len) + value_len
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
        """A frame at `bad` failed its checksum. If a valid frame follows where it says it
        ends, the bytes in between were damaged in place: refuse to read past or cut them."""
        pos = after
        while pos + HEADER.size <= size:
            value_len, _crc, _ts, key_len = HEADER.unpack(os.pread(self._fd, HEADER.size, pos))
            need = HEADER.size + (0 if key_len == NO_KEY else key_len) + value_len
            if pos + need > size or self._whole_frame(pos, need) is None:
                return  # garbage all the way: a torn tail
            raise CorruptLogError(
                f"{self.path}: the frame at byte {bad} fails its checksum but valid frames "
                f"follow (at byte {pos}); the partition is damaged, not torn")

    def _whole_frame(
        self, pos: int, need: int
    ) -> tuple[int, int, bytes | None, bytes, int] | None:
        chunk = os.pread(self._fd, need, pos)
        _value_len, crc, ts, key_len = HEADER.unpack_from(chunk, 0)
        if zlib.crc32(memoryview(chunk)[8:]) != crc:
            return None
        klen = 0 if key_len == NO_KEY else key_len
        key = None if key_len == NO_KEY else chunk[HEADER.size : HEADER.size + klen]
        return pos, ts, key, chunk[HEADER.size + klen :], pos + need

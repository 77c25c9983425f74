"""Consumer groups of the embedded log: members, partition leases, committed positions.

Everything is a file under `<root>/groups/<group>/`:
- `members/<id>.lock` is flocked by a running member, and `members/<id>.beat` holds its
  last heartbeat (CLOCK_MONOTONIC seconds, one clock for every process of this machine),
  written by a thread every session_timeout/4. A member is live while its lock is held AND
  its heartbeat is fresh: a killed process loses its lock at once; a paused one (SIGSTOP,
  a stalled VM) stops beating and expires after the session timeout, like a Kafka member.
- `<topic>/<n>.owner` is the partition's lease: `member` and a counter, bumped by every new
  owner (the KCL's leaseCounter). A member takes a partition whose owner is not live.
- `<topic>/<n>.pos` is the committed position, written only by the lease holder, checked
  and written under the group's mutex (`.mutex`, an flock held for microseconds): a member
  that lost its lease cannot commit, however late it wakes up.
Files are written to a temp file and renamed: a crash leaves the old or the new content.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from topics.log import TopicPartition


def _try_lock(path: Path) -> int | None:
    """Opens and flocks `path`; returns the fd holding the lock, or None if held elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


class GroupDir:
    def __init__(self, root: Path, group: str, session_timeout_s: float = 10.0):
        self.group = group
        self.dir = root / "groups" / group
        self.session_timeout_s = session_timeout_s

    # -- mutual exclusion -----------------------------------------------------------------
    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        path = self.dir / ".mutex"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # -- committed positions --------------------------------------------------------------
    def _pos_path(self, tp: TopicPartition) -> Path:
        return self.dir / tp.topic / f"{tp.partition}.pos"

    def _owner_path(self, tp: TopicPartition) -> Path:
        return self.dir / tp.topic / f"{tp.partition}.owner"

    def _read_pos(self, tp: TopicPartition) -> tuple[int | None, str]:
        text = _read(self._pos_path(tp))
        if text is None:
            return None, ""
        position, _, metadata = text.partition("\n")
        position = position.strip()
        return (None if position in ("", "none") else int(position)), metadata

    def committed(self, tp: TopicPartition) -> int | None:
        return self._read_pos(tp)[0]

    def committed_metadata(self, tp: TopicPartition) -> str:
        return self._read_pos(tp)[1]

    def _write_pos(self, tp: TopicPartition, position: int | None, metadata: str) -> None:
        if "\n" in metadata:
            raise ValueError(f"commit metadata for {tp} must be one line: {metadata!r}")
        text = "none" if position is None else str(position)
        _write_atomic(self._pos_path(tp), f"{text}\n{metadata}" if metadata else text)

    def commit(self, tp: TopicPartition, position: int | None, metadata: str = "",
               lease: tuple[str, int] | None = None) -> bool:
        """Writes the committed position; with `lease` (member, counter) only while that
        lease still holds the partition. Returns False when fenced."""
        with self._mutex():
            if lease is not None and self.lease(tp) != lease:
                return False
            self._write_pos(tp, position, metadata)
            return True

    # -- members --------------------------------------------------------------------------
    def _beat_path(self, member: str) -> Path:
        return self.dir / "members" / f"{member}.beat"

    def join(self, member: str) -> int:
        path = self.dir / "members" / f"{member}.lock"
        for _attempt in range(100):
            fd = _try_lock(path)
            if fd is None:
                raise RuntimeError(f"member id {member!r} is already running in group "
                                   f"{self.group}")
            # Another member's sweep may have taken the file for a dead member's and deleted
            # it between our open and our lock: then we hold a lock nobody can see. Retry.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    self.beat(member)
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise RuntimeError(f"could not join group {self.group} as {member!r}")

    def beat(self, member: str) -> None:
        _write_atomic(self._beat_path(member), repr(time.monotonic()))

    def leave(self, member: str, fd: int) -> None:
        (self.dir / "members" / f"{member}.lock").unlink(missing_ok=True)
        self._beat_path(member).unlink(missing_ok=True)
        os.close(fd)

    def _fresh(self, member: str) -> bool:
        text = _read(self._beat_path(member))
        if not text:
            return True  # joining: the lock is taken just before the first beat
        return time.monotonic() - float(text) <= self.session_timeout_s

    def _alive(self, member: str) -> bool:
        lock = self.dir / "members" / f"{member}.lock"
        if not lock.exists():
            return False
        fd = _try_lock(lock)
        if fd is not None:  # a member that died without leaving
            lock.unlink(missing_ok=True)
            self._beat_path(member).unlink(missing_ok=True)
            os.close(fd)
            return False
        return self._fresh(member)

    def live_members(self) -> list[str]:
        folder = self.dir / "members"
        if not folder.is_dir():
            return []
        return [lock.stem for lock in sorted(folder.glob("*.lock")) if self._alive(lock.stem)]

    # -- partition leases -----------------------------------------------------------------
    def lease(self, tp: TopicPartition) -> tuple[str, int]:
        """(member, counter) of the partition's lease; member "" when free."""
        text = _read(self._owner_path(tp)) or ""
        member, _, counter = text.partition("\n")
        return member, int(counter or 0)

    def try_own(self, tp: TopicPartition, member: str) -> tuple[str, int] | None:
        """Takes the partition if it is free or its owner is not live; returns the lease."""
        with self._mutex():
            owner, counter = self.lease(tp)
            if owner and owner != member and self._alive(owner):
                return None
            lease = (member, counter + 1)
            _write_atomic(self._owner_path(tp), f"{member}\n{counter + 1}")
            return lease

    def release(self, tp: TopicPartition, lease: tuple[str, int]) -> None:
        with self._mutex():
            if self.lease(tp) == lease:
                _write_atomic(self._owner_path(tp), f"\n{lease[1]}")

    def owner(self, tp: TopicPartition) -> str | None:
        member, _counter = self.lease(tp)
        return member if member and self._alive(member) else None

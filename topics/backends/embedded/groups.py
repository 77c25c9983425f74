"""Consumer groups of the embedded log: members, partition ownership, committed positions.

Everything is a file under `<root>/groups/<group>/`, and liveness is an flock: a member
holds `members/<id>.lock` while it runs and `<topic>/<n>.owner` for each partition it
owns. The OS drops the locks of a killed process, so its partitions become free at once
and nobody has to time it out. Positions are written to a temp file and renamed, so a
crash leaves the old or the new position, never half of one.
"""

from __future__ import annotations

import fcntl
import os
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


class GroupDir:
    def __init__(self, root: Path, group: str):
        self.group = group
        self.dir = root / "groups" / group

    def _pos_path(self, tp: TopicPartition) -> Path:
        return self.dir / tp.topic / f"{tp.partition}.pos"

    def _owner_path(self, tp: TopicPartition) -> Path:
        return self.dir / tp.topic / f"{tp.partition}.owner"

    def _read(self, tp: TopicPartition) -> tuple[int | None, str]:
        try:
            text = self._pos_path(tp).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, ""
        position, _, metadata = text.partition("\n")
        position = position.strip()
        return (None if position in ("", "none") else int(position)), metadata

    def committed(self, tp: TopicPartition) -> int | None:
        return self._read(tp)[0]

    def committed_metadata(self, tp: TopicPartition) -> str:
        return self._read(tp)[1]

    def commit(self, tp: TopicPartition, position: int | None, metadata: str = "") -> None:
        if "\n" in metadata:
            raise ValueError(f"commit metadata for {tp} must be one line: {metadata!r}")
        text = "none" if position is None else str(position)
        _write_atomic(self._pos_path(tp), f"{text}\n{metadata}" if metadata else text)

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
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise RuntimeError(f"could not join group {self.group} as {member!r}")

    def leave(self, member: str, fd: int) -> None:
        (self.dir / "members" / f"{member}.lock").unlink(missing_ok=True)
        os.close(fd)

    def live_members(self) -> list[str]:
        folder = self.dir / "members"
        if not folder.is_dir():
            return []
        alive = []
        for lock in sorted(folder.glob("*.lock")):
            fd = _try_lock(lock)
            if fd is None:
                alive.append(lock.stem)
            else:  # a member that died without leaving
                lock.unlink(missing_ok=True)
                os.close(fd)
        return alive

    def try_own(self, tp: TopicPartition, member: str) -> int | None:
        fd = _try_lock(self._owner_path(tp))
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, member.encode(), 0)
        return fd

    def release(self, fd: int) -> None:
        os.close(fd)

    def owner(self, tp: TopicPartition) -> str | None:
        path = self._owner_path(tp)
        if not path.exists():
            return None
        fd = _try_lock(path)
        if fd is not None:  # nobody holds it
            os.close(fd)
            return None
        return path.read_text(encoding="utf-8") or "?"

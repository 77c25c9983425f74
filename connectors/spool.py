"""A local spool of encoded messages: the importer validates the whole file into it before
publishing anything, so a file that fails its error budget leaves no rows on the topic."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import psutil

_HEAD = struct.Struct("<HI")
_BLOCK = 1024 * 1024


class Spool:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(path, "wb")  # noqa: SIM115 - closed by finish()/discard()
        self.messages = 0

    def add(self, partition: int, value: bytes) -> None:
        self._out.write(_HEAD.pack(partition, len(value)))
        self._out.write(value)
        self.messages += 1

    def finish(self) -> None:
        self._out.close()

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb") as f:
            while head := f.read(_HEAD.size):
                partition, size = _HEAD.unpack(head)
                yield partition, f.read(size)

    def discard(self) -> None:
        if not self._out.closed:
            self._out.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def spool_path(folder: Path, batch_id: str) -> Path:
    """This process's spool for a batch; spools of the batch left by dead processes (a
    killed import) are removed."""
    for old in folder.glob(f"{batch_id}.*.spool"):
        pid = old.name.removesuffix(".spool").rsplit(".", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            old.unlink(missing_ok=True)
    return folder / f"{batch_id}.{os.getpid()}.spool"


def import_in_progress(folder: Path, batch_id: str) -> bool:
    """Whether a live process on this machine is importing the batch: its spool exists
    from before the batch is submitted until after it is published."""
    for found in folder.glob(f"{batch_id}.*.spool"):
        pid = found.name.removesuffix(".spool").rsplit(".", 1)[-1]
        if pid.isdigit() and psutil.pid_exists(int(pid)):
            return True
    return False


def spool_stream(source: BinaryIO, folder: Path, on_bytes: Callable[[int], None],
                 name: str = "part") -> tuple[Path, str]:
    """Copies a pipe (standard input, a FIFO, an S3 object) to a file in `folder`, hashing
    it as it streams, so the importer can read it twice (header, then rows) like a file.
    `name` ends the file's name (an object's name: its extension gives the format).
    Returns (path, sha256); the caller removes the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"input.{os.getpid()}.{time.monotonic_ns()}.{name}"
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "wb") as out:
            # read1 returns what the pipe holds now: progress follows a slow producer.
            read = getattr(source, "read1", source.read)
            while block := read(_BLOCK):
                digest.update(block)
                out.write(block)
                size += len(block)
                on_bytes(size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest()

"""Object storage behind one small interface: a local directory or S3 (connectors/s3_store.py),
chosen by URL in `open_store`.

Keys are "/"-separated like S3 keys, so the same deterministic names work on both and a
rewrite after a crash replaces the object instead of adding a second one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote, urlparse

# Temp files of an unfinished put carry this prefix; keys may not use it so list() can
# skip them without mistaking a real object for one.
_TMP_PREFIX = ".tmp-"


class ObjectStore(Protocol):
    """Minimal on purpose: whatever S3 can do cheaply and atomically, nothing more. A store
    may also have `delete(key)` (S3 has: snapshot pruning uses it where present; the local
    store keeps every snapshot, as before)."""

    def put(self, key: str, data: bytes) -> None:
        """Store atomically: readers see the old object or the new one, never a part."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError if there is none."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Sorted keys starting with prefix (a string prefix, as S3 lists)."""
        ...

    def url(self, key: str) -> str:
        """Address for messages and manifests (file:///... locally, s3://... on S3)."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Creates the object unless one exists (atomically: of two writers, one wins);
        False when it existed."""
        ...

    def replace_if_same(self, key: str, expected: bytes, data: bytes) -> bool:
        """Replaces the object if it still holds `expected` (S3: If-Match on the ETag of
        what was read); False when it does not."""
        ...


def open_store(root: str | os.PathLike[str], fsync: bool = True) -> ObjectStore:
    """The store a root names: s3://bucket/prefix, file:///path, or a local path."""
    text = os.fspath(root)
    if text.startswith("s3://"):
        from connectors.s3_store import S3ObjectStore

        return S3ObjectStore(text)
    if text.startswith("file://"):
        text = unquote(urlparse(text).path)
    elif "://" in text:
        raise ValueError(f"{text}: expected s3://BUCKET[/PREFIX], file:///PATH or a path")
    return LocalObjectStore(Path(text), fsync=fsync)


def check_key(key: str) -> None:
    """Reject keys that would escape the root or name one object two ways."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or any(p.startswith(_TMP_PREFIX) for p in parts)
    ):
        raise ValueError(
            f"bad object key {key!r}: keys are '/'-separated, relative, with no empty, "
            f"'.', '..' or '{_TMP_PREFIX}*' parts"
        )


class LocalObjectStore:
    """Objects as files under root, at the path the S3 key would have."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync  # before the rename: the name never outlives the data

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root.joinpath(*key.split("/"))

    def _temp_copy(self, path: Path, data: bytes) -> str:
        """`data` in a temp file beside `path` (so a rename or link stays on one
        filesystem), synced when the store syncs; returns its name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())  # the name must not outlive the data on power loss
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._temp_copy(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._temp_copy(path, data)
        try:
            try:
                os.link(tmp, path)  # a hard link fails if the name exists: one writer wins
            except FileExistsError:
                return False
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def replace_if_same(self, key: str, expected: bytes, data: bytes) -> bool:
        # Compare, then rename: not atomic across processes, unlike S3's If-Match; the
        # local layout is for one machine's workers, which close a batch's last partition
        # one at a time in practice (and the same bytes either way, but after a replay).
        try:
            if self.get(key) != expected:
                return False
        except KeyError:
            return False
        self.put(key, data)
        return True

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix names, not the whole store.
        head, _, _ = prefix.rpartition("/")
        if head:
            check_key(head)  # a prefix may not climb out of the root either
        start = self.root.joinpath(*head.split("/")) if head else self.root
        if not start.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(_TMP_PREFIX)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            keys.extend(
                base + name
                for name in filenames
                if not name.startswith(_TMP_PREFIX) and (base + name).startswith(prefix)
            )
        return sorted(keys)

    def url(self, key: str) -> str:
        # as_uri() would escape the '=' of Hive-style keys (batch=...); keep them readable.
        return "file://" + quote(str(self._path(key).resolve()), safe="/=")

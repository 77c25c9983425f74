"""LocalObjectStore: atomic puts, S3-style keys and listing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.object_store import LocalObjectStore, ObjectStore


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "bucket")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_put_get_exists_creates_parent_dirs(store: LocalObjectStore) -> None:
    as_protocol: ObjectStore = store
    as_protocol.put("batches/b1/p0/000.avro", b"payload")
    assert store.get("batches/b1/p0/000.avro") == b"payload"
    assert store.exists("batches/b1/p0/000.avro")
    assert not store.exists("batches/b1/p0/001.avro")
    assert not store.exists("batches/b1")  # a "directory" is not an object
    assert _files(store.root) == ["batches/b1/p0/000.avro"]


def test_get_missing_is_key_error(store: LocalObjectStore) -> None:
    store.put("a/b", b"x")
    with pytest.raises(KeyError, match="a/c"):
        store.get("a/c")
    with pytest.raises(KeyError):
        store.get("a")  # a directory on disk, not an object


def test_overwrite_replaces_and_leaves_no_temp_files(store: LocalObjectStore) -> None:
    store.put("k/obj", b"first")
    store.put("k/obj", b"first")  # the idempotent rewrite after a crash
    assert store.get("k/obj") == b"first"
    store.put("k/obj", b"second, longer")
    assert store.get("k/obj") == b"second, longer"
    assert _files(store.root) == ["k/obj"]


def test_failed_put_keeps_old_object(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("k/obj", b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.put("k/obj", b"new data that never lands")
    monkeypatch.undo()
    assert store.get("k/obj") == b"old"
    assert _files(store.root) == ["k/obj"]  # the temp file was cleaned up


def test_list_is_sorted_string_prefix_and_skips_temp_files(store: LocalObjectStore) -> None:
    for key in ["b/2", "a/x/1", "a/10", "a/1", "ab/1", "a/x/0"]:
        store.put(key, key.encode())
    (store.root / "a" / ".tmp-crashed").write_bytes(b"partial")  # a put that died
    assert store.list("") == ["a/1", "a/10", "a/x/0", "a/x/1", "ab/1", "b/2"]
    assert store.list("a/") == ["a/1", "a/10", "a/x/0", "a/x/1"]
    assert store.list("a") == ["a/1", "a/10", "a/x/0", "a/x/1", "ab/1"]
    assert store.list("a/1") == ["a/1", "a/10"]
    assert store.list("a/x/") == ["a/x/0", "a/x/1"]
    assert store.list("c/") == []
    assert store.list("a/nope/") == []


def test_list_of_empty_store(store: LocalObjectStore) -> None:
    assert store.list("") == []


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", "..", ".tmp-x", "a/.tmp-1"]
)
def test_bad_keys_are_rejected_naming_the_key(store: LocalObjectStore, key: str) -> None:
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.url(key)):
        with pytest.raises(ValueError, match="bad object key") as info:
            call()
        assert repr(key) in str(info.value)
    with pytest.raises(ValueError):
        store.exists(key)
    assert not store.root.exists() or _files(store.root) == []


def test_list_prefix_cannot_escape_root(store: LocalObjectStore) -> None:
    with pytest.raises(ValueError, match="bad object key"):
        store.list("../")


def test_url_is_absolute_file_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = LocalObjectStore(Path("rel root"))  # relative, with a space
    store.put("b1/p 0.avro", b"x")
    url = store.url("b1/p 0.avro")
    assert url == f"file://{tmp_path.resolve()}/rel%20root/b1/p%200.avro"
    assert (tmp_path / "rel root" / "b1" / "p 0.avro").read_bytes() == b"x"

"""S3ObjectStore against a real S3 API (moto's server): the ObjectStore contract, multipart
uploads, the conditional manifest put, and faults (500, 503 SlowDown, resets) retried."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from connectors import aws
from connectors.change_set import ChangeSet
from connectors.object_store import LocalObjectStore, open_store
from connectors.s3_sink import ManifestConflict, S3Sink, put_once
from connectors.s3_store import S3ObjectStore
from tests.aws_server import FaultProxy, aws_env, every, make_bucket, moto_endpoint

__all__ = ["aws_env", "moto_endpoint"]  # fixtures, used by name


@pytest.fixture
def store(aws_env: dict[str, str]) -> S3ObjectStore:
    return S3ObjectStore(f"s3://{make_bucket()}/root/prefix")


def test_contract(store: S3ObjectStore) -> None:
    store.put("a/b/c.bin", b"one")
    store.put("a/b/c.bin", b"two")  # replaced, not added
    store.put("a/d.bin", b"")
    assert store.get("a/b/c.bin") == b"two"
    assert store.get("a/d.bin") == b""
    assert store.exists("a/b/c.bin") and not store.exists("a/b")
    assert store.list("a/") == ["a/b/c.bin", "a/d.bin"]
    assert store.list("a/b") == ["a/b/c.bin"]
    assert store.list("zzz") == []
    assert store.url("a/b/c.bin") == f"s3://{store.bucket}/root/prefix/a/b/c.bin"
    with pytest.raises(KeyError):
        store.get("missing")
    store.delete("a/d.bin")
    assert store.list("a/") == ["a/b/c.bin"]
    with pytest.raises(ValueError):
        store.put("../escape", b"x")


def test_list_reads_every_page(store: S3ObjectStore) -> None:
    store.page_size = 7
    keys = [f"k/{i:05d}" for i in range(40)]
    for key in keys:
        store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=b"")
    assert store.list("k/") == keys


def test_multipart_above_the_threshold(store: S3ObjectStore) -> None:
    big = S3ObjectStore(f"s3://{store.bucket}/mp", multipart_threshold=6 << 20,
                        part_size=5 << 20)
    data = bytes(range(256)) * ((11 << 20) // 256 + 7)
    big.put("x/big.bin", data)
    assert big.get("x/big.bin") == data
    head = big.client.head_object(Bucket=big.bucket, Key="mp/x/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: an ETag, not an MD5
    assert big.client.list_multipart_uploads(Bucket=big.bucket).get("Uploads", []) == []


def test_conditional_put_one_writer_wins(store: S3ObjectStore) -> None:
    assert store.put_if_absent("m.json", b"first")
    assert not store.put_if_absent("m.json", b"second")
    assert store.get("m.json") == b"first"
    put_once(store, "m.json", b"first")  # the same bytes again: done
    # Other bytes (a replay changed the partition manifests): replaced, conditionally.
    put_once(store, "m.json", b"second")
    assert store.get("m.json") == b"second"
    assert not store.replace_if_same("m.json", b"first", b"third")  # not what was read
    assert store.get("m.json") == b"second"


def test_manifest_race_lost_to_other_bytes_is_an_error(store: S3ObjectStore) -> None:
    """The object changes between this writer's read and its If-Match put."""
    store.put("m.json", b"old")
    real_get = store.get

    def get_then_another_writer(key: str) -> bytes:
        data = real_get(key)
        if data == b"old":
            store.put(key, b"another writer's")
        return data

    store.get = get_then_another_writer  # type: ignore[method-assign]
    with pytest.raises(ManifestConflict, match="two writers disagree"):
        put_once(store, "m.json", b"mine")
    assert real_get("m.json") == b"another writer's"


def test_local_conditional_put(tmp_path: Path) -> None:
    local = LocalObjectStore(tmp_path)
    assert local.put_if_absent("a/m.json", b"first")
    assert not local.put_if_absent("a/m.json", b"second")
    assert local.get("a/m.json") == b"first"
    assert local.list("a/") == ["a/m.json"]  # no temp file left behind


def test_open_store_by_url(tmp_path: Path, aws_env: dict[str, str]) -> None:
    assert isinstance(open_store(tmp_path), LocalObjectStore)
    assert open_store(f"file://{tmp_path}").root == tmp_path.resolve()  # type: ignore[attr-defined]
    s3 = open_store("s3://bucket-x/some/prefix")
    assert isinstance(s3, S3ObjectStore)
    assert (s3.bucket, s3.prefix) == ("bucket-x", "some/prefix/")
    with pytest.raises(ValueError, match="expected s3://"):
        open_store("gs://bucket/x")


def _changes(batch: str, partition: int, n: int, position: int) -> ChangeSet:
    return ChangeSet.from_lists(batch, partition, position, [f"u{i}" for i in range(n)],
                                ["s"] * n, ["add"] * n, list(range(n)))


def test_sink_writes_the_local_layout_to_s3(store: S3ObjectStore, tmp_path: Path) -> None:
    """Same keys and bytes on S3 as in a local directory; the manifest lists s3:// URLs
    with content_length, as Redshift's COPY ... MANIFEST reads them."""
    local = LocalObjectStore(tmp_path)
    for target in (store, local):
        sink = S3Sink(target)
        for partition in range(2):
            sink.write_chunk(_changes("b1", partition, 10 + partition, 100 + partition))
            sink.close_partition("b1", partition, 2, 200 + partition)
    keys = local.list("")
    assert store.list("") == keys
    for key in keys:
        if not key.endswith("manifest.json"):
            assert store.get(key) == local.get(key)
    manifest = json.loads(store.get("audience/segment-changes/batch=b1/manifest.json"))
    assert [e["url"] for e in manifest["entries"]] == [
        f"s3://{store.bucket}/root/prefix/audience/segment-changes/batch=b1/partition={p}/"
        f"part-{100 + p:020d}-00000.parquet" for p in range(2)]
    for entry in manifest["entries"]:
        key = entry["url"].removeprefix(f"s3://{store.bucket}/root/prefix/")
        assert entry["mandatory"] is True
        assert entry["meta"]["content_length"] == len(store.get(key))


def test_faults_are_retried(aws_env: dict[str, str], moto_endpoint: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """500s, 503 SlowDown and connection resets mid-upload: every put and get still lands,
    byte for byte, multipart parts included."""
    bucket = make_bucket()
    upstream = moto_endpoint.removeprefix("http://")
    with FaultProxy(upstream, every(3)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        faulty = S3ObjectStore(f"s3://{bucket}/f", client=aws.client("s3"),
                               multipart_threshold=5 << 20, part_size=5 << 20)
        blobs = {f"k/{i:03d}": hashlib.sha256(str(i).encode()).digest() * (i + 1)
                 for i in range(15)}
        blobs["k/big"] = b"x" * (10 << 20)
        for key, data in blobs.items():
            faulty.put(key, data)
        got = {key: faulty.get(key) for key in faulty.list("k/")}
    assert got == blobs
    assert {"500", "503", "reset"} <= set(proxy.faults)
    assert sum(proxy.faults.values()) >= 10


def test_get_rereads_a_body_cut_off(aws_env: dict[str, str], moto_endpoint: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore retries a GET until its headers only: a body reset after them is the
    store's to read again (a regression test: it raised out of the sink)."""
    bucket = make_bucket()
    data = b"0123456789" * 100_000
    aws.client("s3").put_object(Bucket=bucket, Key="c/o.bin", Body=data)
    cuts = iter([True, True, False])
    policy = lambda method, path: "cut" if "o.bin" in path and next(cuts) else None  # noqa: E731
    with FaultProxy(moto_endpoint.removeprefix("http://"), policy) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert S3ObjectStore(f"s3://{bucket}/c").get("o.bin") == data
    assert proxy.faults == {"cut": 2}

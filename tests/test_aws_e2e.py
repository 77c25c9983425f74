"""End to end through the CLI on a real S3 API (moto's server): an s3:// input file, the
S3 sink and the state snapshots on a bucket, `streams verify` folding the bucket's objects;
the same keys and bytes as the local layout; input errors; injected S3 faults."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

from connectors import aws
from connectors.object_store import LocalObjectStore
from connectors.s3_fold import fold_objects
from connectors.s3_store import S3ObjectStore
from tests.aws_server import FaultProxy, aws_env, every, make_bucket, moto_endpoint
from tests.support import expected_members, random_rows, run_cli, warehouse_members, write_csv

__all__ = ["aws_env", "moto_endpoint"]  # fixtures, used by name
PREFIX = "audience/segment-changes"


def _upload_csv_gz(bucket: str, key: str, rows: list[tuple[str, str, str]],
                   tmp_path: Path) -> bytes:
    data = gzip.compress(write_csv(tmp_path / "rows.csv", rows).read_bytes(), mtime=0)
    aws.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    return data


def _s3_args(bucket: str) -> list[str]:
    return ["--s3-root", f"s3://{bucket}/out", "--state-root", f"s3://{bucket}/state"]


def test_run_from_s3_to_s3_then_verify(aws_env: dict[str, str], tmp_path: Path) -> None:
    bucket = make_bucket()
    rows = random_rows(3000, users=800, segments=4, seed=9)
    data = _upload_csv_gz(bucket, "in/users.csv.gz", rows, tmp_path)
    url = f"s3://{bucket}/in/users.csv.gz"
    first = run_cli("run", url, "-q", *_s3_args(bucket), data_dir=tmp_path / "d", env=aws_env)
    assert "status      closed" in first.stdout
    assert f"source      {url}" in first.stdout
    assert f"output      s3: s3://{bucket}/out/{PREFIX}/batch=" in first.stdout
    members = expected_members([("add", rows)])
    assert set(warehouse_members(tmp_path / "d")) == members
    store = S3ObjectStore(f"s3://{bucket}/out")
    assert fold_objects(store, PREFIX) == members
    assert S3ObjectStore(f"s3://{bucket}/state").list("_state/")  # snapshots on S3
    verify = run_cli("verify", *_s3_args(bucket), data_dir=tmp_path / "d", env=aws_env)
    assert verify.stdout.startswith(f"verified: {len(members):,} members")
    # The checksum is of the bytes (the same file locally is the same batch) ...
    (tmp_path / "users.csv.gz").write_bytes(data)
    local = run_cli("run", str(tmp_path / "users.csv.gz"), "-q", data_dir=tmp_path / "l",
                    env=aws_env)
    batch = first.stdout.split()[1].rstrip(":")
    assert local.stdout.split()[1].rstrip(":") == batch
    # ... and the S3 layout is the local one: same keys, same object bytes.
    local_store = LocalObjectStore(tmp_path / "l" / "s3")
    keys = local_store.list(PREFIX)
    assert store.list(PREFIX) == keys and len(keys) > 4
    for key in keys:
        if not key.endswith("manifest.json"):
            assert store.get(key) == local_store.get(key), key
    manifest = json.loads(store.get(f"{PREFIX}/batch={batch}/manifest.json"))
    assert all(e["url"].startswith(f"s3://{bucket}/out/{PREFIX}/batch={batch}/partition=")
               for e in manifest["entries"])
    # The same object again is a duplicate: nothing changes.
    again = run_cli("run", url, "-q", *_s3_args(bucket), data_dir=tmp_path / "d", env=aws_env)
    assert "already imported" in again.stdout


@pytest.mark.parametrize("what", ["no such object", "no such bucket", "no AWS credentials found"])
def test_unreadable_input_is_one_line_and_publishes_nothing(
        aws_env: dict[str, str], tmp_path: Path, what: str) -> None:
    bucket = make_bucket()
    _upload_csv_gz(bucket, "in/ok.csv.gz", [("u1", "s", "add")], tmp_path)
    url = {"no such object": f"s3://{bucket}/in/missing.csv",
           "no such bucket": "s3://no-such-bucket-here/x.csv",
           "no AWS credentials found": f"s3://{bucket}/in/ok.csv.gz"}[what]
    env = dict(aws_env)
    if what == "no AWS credentials found":
        env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SESSION_TOKEN="")
    proc = run_cli("import", url, "-q", data_dir=tmp_path / "d", env=env, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {url}: cannot read it from S3 ({what}); expected an object "
                      "this process's AWS credentials may read; nothing was imported"]
    status = run_cli("status", "--json", data_dir=tmp_path / "d", env=aws_env)
    assert json.loads(status.stdout) == []
    assert not list((tmp_path / "d" / "spool").glob("input.*"))


def test_run_survives_s3_faults(aws_env: dict[str, str], moto_endpoint: str,
                                tmp_path: Path) -> None:
    """Every 4th S3 request answers 503 SlowDown or 500, or has its connection reset
    mid-upload or mid-download: the run retries, and every output is exact."""
    bucket = make_bucket()
    rows = random_rows(20_000, users=5000, segments=5, seed=3)
    # Small chunks and many partition objects: many puts to fault.
    _upload_csv_gz(bucket, "in/big.csv.gz", rows, tmp_path)
    url = f"s3://{bucket}/in/big.csv.gz"
    upstream = moto_endpoint.removeprefix("http://")
    with FaultProxy(upstream, every(4, kinds=("503", "reset", "cut", "500"))) as proxy:
        env = {**aws_env, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
        run_cli("run", url, "-q", "--chunk-rows", "700", *_s3_args(bucket),
                data_dir=tmp_path / "d", env=env)
    assert {"503", "500", "reset", "cut"} <= set(proxy.faults), proxy.faults
    members = expected_members([("add", rows)])
    assert set(warehouse_members(tmp_path / "d")) == members
    assert fold_objects(S3ObjectStore(f"s3://{bucket}/out"), PREFIX) == members
    verify = run_cli("verify", *_s3_args(bucket), data_dir=tmp_path / "d", env=aws_env)
    assert verify.stdout.startswith(f"verified: {len(members):,} members")


def test_object_stream_resumes_after_a_cut(aws_env: dict[str, str], moto_endpoint: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.s3_input import ObjectStream

    bucket = make_bucket()
    data = bytes(range(256)) * 40_000
    aws.client("s3").put_object(Bucket=bucket, Key="o.bin", Body=data)
    cuts = iter([True, False, True, True, False] + [False] * 100)
    policy = lambda method, _path: "cut" if method == "GET" and next(cuts) else None  # noqa: E731
    with FaultProxy(moto_endpoint.removeprefix("http://"), policy) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        stream = ObjectStream(f"s3://{bucket}/o.bin")
        got = io.BufferedReader(stream).read()
    assert got == data
    assert stream.resumes >= 1

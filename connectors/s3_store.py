"""The ObjectStore on S3 (or an S3-compatible store) through boto3.

Keys are the local layout's keys under the root's prefix, so `--s3-root s3://bucket/prefix`
holds the same keys and bytes as a local `--s3-root`. A put is atomic on S3 (readers see
the old object or the new one); objects of `multipart_threshold` bytes or more go up as a
multipart upload, whose parts are retried one by one rather than the whole object.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any
from urllib.parse import urlparse

from connectors import aws
from connectors.object_store import check_key

MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 8 << 20  # S3's least is 5 MiB (but for the last part)
BODY_ATTEMPTS = 8  # reads of an object whose body breaks off


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key or prefix) of s3://bucket/key; ValueError naming the URL otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url}: expected s3://BUCKET[/PREFIX]")
    return parsed.netloc, parsed.path.lstrip("/")


class S3ObjectStore:
    def __init__(self, url: str, client: Any = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
                 page_size: int = 1000):
        self.bucket, prefix = parse_s3_url(url)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client if client is not None else aws.client("s3")
        self.multipart_threshold = multipart_threshold
        self.part_size = max(part_size, 5 << 20)
        self.page_size = page_size  # keys per listing request (S3's most is 1,000)

    def _key(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        if len(data) >= self.multipart_threshold:
            self._multipart(full, data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Creates the object unless one exists (If-None-Match: *): of two writers, one
        wins. False when it existed."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   IfNoneMatch="*")
        except Exception as exc:
            if aws.error_code(exc) in ("PreconditionFailed", "412"):
                return False
            raise
        return True

    def replace_if_same(self, key: str, expected: bytes, data: bytes) -> bool:
        full = self._key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            if response["Body"].read() != expected:
                return False
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                   IfMatch=response["ETag"])
        except Exception as exc:
            if aws.error_code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return False
            raise
        return True

    def _multipart(self, full: str, data: bytes) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for number, start in enumerate(range(0, len(data), self.part_size), start=1):
                body = bytes(view[start : start + self.part_size])
                etag = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload,
                                               PartNumber=number, Body=body)["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=full,
                                                  UploadId=upload,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            # An unfinished upload is invisible but billed: abort it (best effort; a
            # lifecycle rule for incomplete uploads covers a crash here).
            # The first error is the one to report.
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                   UploadId=upload)
            raise

    def get(self, key: str) -> bytes:
        # botocore retries a request until its response headers; a body cut off after them
        # is read again here.
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as exc:
                if aws.error_code(exc) in ("NoSuchKey", "404"):
                    raise KeyError(key) from None
                raise
            try:
                data: bytes = response["Body"].read()
            except Exception as exc:
                if attempt == BODY_ATTEMPTS or not aws.is_stream_error(exc):
                    raise
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
                continue
            if len(data) == response["ContentLength"]:
                return data
        raise OSError(f"{self.url(key)}: body cut short {BODY_ATTEMPTS} times")

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if aws.error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix,
                                       PaginationConfig={"PageSize": self.page_size}):
            keys.extend(obj["Key"][len(self.prefix):] for obj in page.get("Contents", ()))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

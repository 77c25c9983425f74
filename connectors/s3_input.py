"""Input files on S3 (`streams run s3://bucket/key.csv.gz`): the object as a byte stream.

The importer copies it into its spool while hashing it (as it does standard input), so the
batch checksum is the SHA-256 of the bytes read, never the ETag (a multipart object's ETag
is no content hash). A connection dropped mid-object resumes where it stopped, with a
ranged GET pinned to the ETag of the first response (If-Match): the bytes are the one
object's even if it is overwritten meanwhile (then the read fails: 412).
"""

from __future__ import annotations

import io
import time
from typing import Any

from connectors import aws
from connectors.rows import InputFileError
from connectors.s3_store import parse_s3_url

RESUMES = 8  # reconnections per object after a dropped stream


def is_s3_url(path: str) -> bool:
    return path.startswith("s3://")


def _explain(url: str, exc: BaseException) -> InputFileError:
    return InputFileError(f"{url}: cannot read it from S3 ({aws.reason(exc)}); expected an "
                          "object this process's AWS credentials may read; nothing was "
                          "imported")


class ObjectStream(io.RawIOBase):
    """A readable stream of one S3 object, resumed after a dropped connection."""

    def __init__(self, url: str, client: Any = None):
        super().__init__()
        self.url = url
        self.bucket, self.key = parse_s3_url(url)
        if not self.key:
            raise InputFileError(f"{url}: names a bucket, not an object; expected "
                                 "s3://BUCKET/KEY")
        self.client = client if client is not None else aws.client("s3")
        self.offset = 0
        self.resumes = 0
        response = self._get()
        self.etag: str = response["ETag"]
        self.size: int = response["ContentLength"]
        self._body = response["Body"]

    def _get(self, **extra: Any) -> dict[str, Any]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key, **extra)  # type: ignore[no-any-return]
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, (BotoCoreError, ClientError)):  # no credentials, no bucket
                raise _explain(self.url, exc) from None
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                data = self._body.read(len(view)) if self.offset < self.size else b""
            except Exception as exc:
                if not aws.is_stream_error(exc):
                    raise
                self._resume(exc)
                continue
            if not data and self.offset < self.size:
                self._resume(EOFError(f"stream ended at byte {self.offset}"))
                continue
            view[: len(data)] = data
            self.offset += len(data)
            return len(data)

    def _resume(self, exc: BaseException) -> None:
        if self.resumes >= RESUMES:
            raise InputFileError(f"{self.url}: the download broke off at byte "
                                 f"{self.offset:,} of {self.size:,} {RESUMES + 1} times "
                                 f"({exc}); nothing was imported") from None
        self.resumes += 1
        time.sleep(min(0.1 * 2 ** self.resumes, 5.0))  # backoff before reconnecting
        self._body.close()
        self._body = self._get(Range=f"bytes={self.offset}-", IfMatch=self.etag)["Body"]

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def object_name(url: str) -> str:
    """The object's last name segment (users.csv.gz): it names the format."""
    return parse_s3_url(url)[1].rpartition("/")[2]

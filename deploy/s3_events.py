"""The S3 "object created" event in the two shapes a trigger receives it: EventBridge's
(`detail-type: Object Created`, `source: aws.s3`) and the classic S3 notification
(`Records[].eventName: ObjectCreated:*`, also what SNS/SQS fan-outs carry inside them).

A trigger names one object version: the batch id of a triggered import derives from it, so
a double-fired event (S3 -> EventBridge is at-least-once) maps to the same batch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

# The importer's rule for a batch id (connectors/importer.py BATCH_ID).
BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BadEvent(ValueError):
    """An event that is not an S3 object-created event; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class ObjectCreated:
    bucket: str
    key: str
    size: int
    version: str  # the version id, else the ETag (same bytes, same version), else sequencer
    sequencer: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def batch_id(self) -> str:
        """The batch of a triggered import: one per object version (bucket, key, version)."""
        identity = f"{self.bucket}\n{self.key}\n{self.version}"
        return "s3-" + hashlib.sha256(identity.encode()).hexdigest()[:20]


def parse(event: Any) -> ObjectCreated:
    """The object of an EventBridge "Object Created" event or of an S3 notification with one
    record; BadEvent naming the field otherwise."""
    if not isinstance(event, dict):
        raise BadEvent(f"expected an S3 event (a JSON object), got {type(event).__name__}")
    if "detail" in event or "detail-type" in event:
        return _eventbridge(event)
    if "Records" in event:
        return _notification(event)
    got = f"keys {', '.join(sorted(map(str, event)))}" if event else "an empty object"
    raise BadEvent("not an S3 object-created event: expected EventBridge's 'detail-type' and "
                   f"'detail', or an S3 notification's 'Records'; got {got}")


def _eventbridge(event: dict[str, Any]) -> ObjectCreated:
    kind = event.get("detail-type")
    if event.get("source") != "aws.s3" or kind != "Object Created":
        raise BadEvent(f"EventBridge event source {event.get('source')!r}, detail-type "
                       f"{kind!r}: expected source 'aws.s3', detail-type 'Object Created'")
    detail = _field(event, "detail", dict, "event")
    bucket = _field(_field(detail, "bucket", dict, "detail"), "name", str, "detail.bucket")
    obj = _field(detail, "object", dict, "detail")
    key = _field(obj, "key", str, "detail.object")  # EventBridge keys are not URL-encoded
    return _object(bucket, key, obj, "detail.object", version_field="version-id")


def _notification(event: dict[str, Any]) -> ObjectCreated:
    records = _field(event, "Records", list, "event")
    if len(records) != 1:
        raise BadEvent(f"S3 notification with {len(records)} records: expected exactly one "
                       "(S3 sends one object per notification)")
    record = records[0]
    if not isinstance(record, dict):
        raise BadEvent("Records[0]: expected an object")
    name = str(record.get("eventName", ""))
    if record.get("eventSource") != "aws:s3" or not name.startswith("ObjectCreated:"):
        raise BadEvent(f"Records[0]: eventSource {record.get('eventSource')!r}, eventName "
                       f"{name!r}: expected eventSource 'aws:s3', eventName 'ObjectCreated:*'")
    s3 = _field(record, "s3", dict, "Records[0]")
    bucket = _field(_field(s3, "bucket", dict, "Records[0].s3"), "name", str,
                    "Records[0].s3.bucket")
    obj = _field(s3, "object", dict, "Records[0].s3")
    # Notification keys are URL-encoded, spaces as '+'.
    key = unquote_plus(_field(obj, "key", str, "Records[0].s3.object"))
    return _object(bucket, key, obj, "Records[0].s3.object", version_field="versionId")


def _object(bucket: str, key: str, obj: dict[str, Any], where: str,
            version_field: str) -> ObjectCreated:
    if not bucket or not key:
        raise BadEvent(f"{where}: empty bucket or key")
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadEvent(f"{where}.size {size!r}: expected the object's size in bytes")
    sequencer = str(obj.get("sequencer") or "")
    version = str(obj.get(version_field) or obj.get("etag") or obj.get("eTag") or sequencer)
    if not version:
        raise BadEvent(f"{where}: no {version_field}, etag or sequencer to tell this version "
                       "of the object from the next")
    return ObjectCreated(bucket, key, size, version, sequencer)


def _field(parent: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = parent.get(name)
    if not isinstance(value, kind):
        raise BadEvent(f"{where}.{name}: expected {'an object' if kind is dict else kind.__name__}"
                       f", got {type(value).__name__ if value is not None else 'nothing'}")
    return value

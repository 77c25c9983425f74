"""Submit: the first state of the state machine, on an S3 object created.

Input: the EventBridge "Object Created" event or an S3 notification, as delivered, or
`{"event": <that>, "execution": "<execution id>"}` (what the state machine passes, so that
its own retry of this step is not mistaken for a double fire). Output: what the next states
need: the batch id, the object, its size and format, whether it is a duplicate, whether it
is small enough for the import on Lambda, and the command of the import's Fargate task.
"""

from __future__ import annotations

from typing import Any

from connectors.dynamo import claim_object, claim_of, ensure_guard_table
from connectors.dynamo_status import StatusTable
from connectors.readers import detect_format
from connectors.rows import InputFileError
from deploy import s3_events
from deploy.lambdas.runtime import BadEvent, now_ms, settings

# The state machine's wait for the batch to close: a read of the status table every
# POLL_SECONDS, at most MAX_POLLS times (an hour), then the batch counts as not closed.
POLL_SECONDS = 15
MAX_POLLS = 240


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    execution = ""
    if isinstance(event, dict) and "event" in event:
        execution = str(event.get("execution") or "")
        event = event["event"]
    obj = s3_events.parse(event)
    chosen = settings(require=("guard_table", "status_table"))
    try:
        fmt = detect_format(obj.key)
    except InputFileError as exc:
        raise BadEvent(str(exc)) from None
    claimer = execution or getattr(context, "aws_request_id", "") or "submit"
    ensure_guard_table(chosen.guard_table)
    first = claim_object(chosen.guard_table, obj.bucket, obj.key, obj.version,
                         batch_id=obj.batch_id, claimer=claimer)
    if not first:
        # Claimed before: by another execution (a double fire), or by this one in an attempt
        # that failed after the claim (its retry must go on).
        claim = claim_of(chosen.guard_table, obj.bucket, obj.key, obj.version) or {}
        first = bool(execution) and claim.get("claimer") == execution
    at = now_ms()
    if first:
        StatusTable(chosen.status_table).submit(obj.batch_id, obj.url, at, {
            "phase": "ended", "at": at, "size": obj.size, "format": fmt,
            "execution": execution})
    return {
        "batch_id": obj.batch_id, "url": obj.url, "bucket": obj.bucket, "key": obj.key,
        "version": obj.version, "size": obj.size, "format": fmt, "duplicate": not first,
        "on_lambda": obj.size <= chosen.lambda_import_max_bytes,
        "poll_seconds": POLL_SECONDS, "max_polls": MAX_POLLS,
        # The Fargate task's command (the image's ENTRYPOINT is `streams`).
        "command": ["import", obj.url, "--batch-id", obj.batch_id, "-q"],
    }

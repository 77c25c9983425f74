"""Status step: a state machine task that records a step's start, end or error into the
batch's item of the status table (`step_<name>`; for an error also
`execution_failed_step` and `execution_error`), so every step's outcome is visible beside
the pipeline's own status.

Input: `{"step": NAME, "phase": "started" | "ended" | "failed", "state": <the state's
input>, "execution": <execution id>}`; the batch id is `state.batch.batch_id`, or, when
Submit itself failed, derived from the S3 event in `state` (an event that is no S3 event
has no batch: nothing is recorded, and the alert still goes). The error is the Catch's
`state.error` (`Error`, `Cause`); a Lambda error's Cause is JSON (`errorMessage`), an ECS
task's the task (its `StoppedReason` and exit code).
"""

from __future__ import annotations

import json
from typing import Any

from connectors.dynamo_status import StatusTable
from deploy import s3_events
from deploy.lambdas.runtime import BadEvent, now_ms, settings

PHASES = ("started", "ended", "failed")
ERROR_LIMIT = 1000  # characters kept of an error (DynamoDB items are at most 400 KB)


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    if not isinstance(event, dict) or not isinstance(event.get("step"), str) \
            or event.get("phase") not in PHASES:
        raise BadEvent(f"expected {{'step': NAME, 'phase': one of {', '.join(PHASES)}, "
                       "'state': the state's input}")
    state = event.get("state") if isinstance(event.get("state"), dict) else {}
    batch_id = batch_of(state)
    record: dict[str, Any] = {"phase": event["phase"], "at": now_ms(),
                              "execution": str(event.get("execution") or "")}
    if event["phase"] == "failed":
        record["error"] = error_text(state.get("error"))
    if batch_id is None:
        return {"recorded": False, "batch_id": None, **record}
    chosen = settings(require=("status_table",))
    StatusTable(chosen.status_table).record_step(batch_id, event["step"], record)
    return {"recorded": True, "batch_id": batch_id, **record}


def batch_of(state: dict[str, Any]) -> str | None:
    batch = state.get("batch")
    if isinstance(batch, dict) and isinstance(batch.get("batch_id"), str):
        return batch["batch_id"]
    try:
        return s3_events.parse(state.get("event", state)).batch_id
    except s3_events.BadEvent:
        return None


def error_text(error: Any) -> str:
    """One line: the error's name and its message (from a Lambda or ECS Cause)."""
    if not isinstance(error, dict):
        return str(error or "unknown error")[:ERROR_LIMIT]
    name, cause = str(error.get("Error", "")), error.get("Cause", "")
    message = cause
    if isinstance(cause, str) and cause.startswith("{"):
        try:
            parsed = json.loads(cause)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            message = parsed.get("errorMessage") or _task_reason(parsed) or cause
    text = f"{name}: {message}" if name and message else name or str(message)
    return " ".join(str(text).split())[:ERROR_LIMIT]


def _task_reason(task: dict[str, Any]) -> str:
    codes = [f"{c.get('Name')} exited {c.get('ExitCode')}" for c in task.get("Containers", [])
             if isinstance(c, dict) and c.get("ExitCode") not in (None, 0)]
    return "; ".join(filter(None, [str(task.get("StoppedReason") or ""), *codes]))

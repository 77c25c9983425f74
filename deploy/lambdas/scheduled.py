"""Scheduled jobs: what an EventBridge Scheduler schedule (or a scheduled EventBridge rule)
runs on the same image, named by the schedule's input.

    {"job": "reimport", "url": "s3://BUCKET/KEY", "mode": "replace", "segment": "vip"}
        import the object's current content (a nightly full list): the batch id derives
        from the content and the options, so an unchanged object changes nothing
        (outcome "duplicate");
    {"job": "replay", "from": "earliest" | "position:N" | "batch:ID"}
        rewind the segments processor and the sinks and reprocess (`streams replay`); it
        refuses while workers run, as the command does.

A scheduled rule's event (`detail-type: Scheduled Event`) carries no input of its own: its
job is the rule's target Input, or the function's STREAMS_SCHEDULED_JOB (the same JSON).
"""

from __future__ import annotations

import json
import os
from typing import Any

from connectors.importer import ImportRefused
from connectors.rows import InputFileError
from deploy.lambdas.runtime import BadEvent, pipeline, settings

JOBS = ("reimport", "replay")
IMPORT_OPTIONS = ("segment", "mode", "format", "delimiter", "max_rejects")


class JobFailed(Exception):
    """The job ran and did not do what it should (a failed import, a refused replay)."""


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    job = _job(event)
    chosen = settings()
    with pipeline(chosen) as pipe:
        if job["job"] == "reimport":
            return _reimport(pipe, job)
        return _replay(pipe, job)


def _job(event: Any) -> dict[str, Any]:
    if isinstance(event, dict) and event.get("detail-type") == "Scheduled Event":
        text = os.environ.get("STREAMS_SCHEDULED_JOB", "")
        try:
            event = json.loads(text)
        except ValueError:
            raise BadEvent("a scheduled rule's event names no job: set the target's Input or "
                           f"STREAMS_SCHEDULED_JOB to a job's JSON; got {text!r}") from None
    if not isinstance(event, dict) or event.get("job") not in JOBS:
        got = event.get("job") if isinstance(event, dict) else event
        raise BadEvent(f"job {got!r}: expected an object with 'job' one of {', '.join(JOBS)}")
    if event["job"] == "reimport" and not str(event.get("url", "")).startswith("s3://"):
        raise BadEvent(f"reimport: url {event.get('url')!r}: expected s3://BUCKET/KEY")
    if event["job"] == "replay" and not isinstance(event.get("from", "earliest"), str):
        raise BadEvent("replay: 'from' expected earliest, position:N or batch:ID")
    return event


def _reimport(pipe: Any, job: dict[str, Any]) -> dict[str, Any]:
    options = {name: job[name] for name in IMPORT_OPTIONS if job.get(name) is not None}
    if "format" in options:
        options["fmt"] = options.pop("format")
    try:
        result = pipe.importer().run(pipe.import_request(job["url"], **options))
    except InputFileError as exc:
        raise JobFailed(str(exc)) from None
    except (ImportRefused, ValueError) as exc:
        raise BadEvent(str(exc)) from None
    if result.outcome == "failed":
        raise JobFailed(result.error)
    return {"job": "reimport", "batch_id": result.batch_id, "outcome": result.outcome,
            "rows": result.rows, "rejected": result.rejected}


def _replay(pipe: Any, job: dict[str, Any]) -> dict[str, Any]:
    from topics.log import GroupBusyError

    start = job.get("from", "earliest")
    try:
        report = pipe.replay(start)
    except (GroupBusyError, ValueError) as exc:
        raise JobFailed(f"replay from {start}: {exc}") from None
    return {"job": "replay", "from": start, "report": report}

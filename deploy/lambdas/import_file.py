"""Import on Lambda: one object, small enough (Submit's `on_lambda`) to be read, validated and
published well inside Lambda's 15 minutes; larger ones run `streams import` on Fargate.

Input: Submit's output (`batch_id`, `url`; optional `segment`, `mode`, `format`,
`delimiter`, `max_rejects`). The import is the project's importer, as `streams import URL
--batch-id ID` runs it: idempotent, so the state machine's retry of this step resumes or
finds the batch done.
"""

from __future__ import annotations

from typing import Any

from connectors.importer import ImportRefused
from connectors.rows import InputFileError
from deploy.lambdas.runtime import BadEvent, pipeline, settings


class ImportFailed(Exception):
    """The batch failed at its import (bad input, over the error budget)."""


OPTIONS = ("segment", "mode", "delimiter", "max_rejects")


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    if not isinstance(event, dict) or not isinstance(event.get("url"), str) \
            or not isinstance(event.get("batch_id"), str):
        raise BadEvent("expected Submit's output: an object with 'url' (s3://BUCKET/KEY) and "
                       "'batch_id'")
    if not event["url"].startswith("s3://"):
        raise BadEvent(f"url {event['url']!r}: expected s3://BUCKET/KEY")
    options = {name: event[name] for name in OPTIONS if event.get(name) is not None}
    if event.get("format") is not None:
        options["fmt"] = event["format"]
    chosen = settings()
    with pipeline(chosen) as pipe:
        try:
            result = pipe.importer().run(pipe.import_request(
                event["url"], batch_id=event["batch_id"], **options))
        except InputFileError as exc:
            raise ImportFailed(str(exc)) from None
        except (ImportRefused, ValueError) as exc:
            raise BadEvent(str(exc)) from None
    if result.outcome in ("failed", "previously_failed"):
        raise ImportFailed(result.error or f"batch {result.batch_id} failed at its import")
    return {"batch_id": result.batch_id, "outcome": result.outcome, "rows": result.rows,
            "rejected": result.rejected, "partition_counts": result.partition_counts,
            "seconds": round(result.seconds, 3)}

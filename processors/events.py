"""Pipeline events: every step of a batch appends one to `pipeline.events`, keyed by batch."""

from __future__ import annotations

from typing import Any

from streams.api import Output
from topics.spec import EVENTS

KINDS = ("submitted", "published", "partition_applied", "sink_committed", "failed")


def batch_event(batch_id: str, kind: str, at_ms: int, **fields: Any) -> Output:
    if kind not in KINDS:
        raise ValueError(f"unknown batch event kind {kind!r}; expected one of {KINDS}")
    return Output(EVENTS, "BatchEvent", {"batch_id": batch_id, "kind": kind, "at_ms": at_ms,
                                         **fields}, key=batch_id)

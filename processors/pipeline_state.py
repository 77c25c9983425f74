"""Pipeline state: the status of every batch, folded from its events.

Events arrive on `pipeline.events` keyed by batch id. The fold is idempotent: a repeated
event (a re-sent import, a sink that commits again after a crash) changes nothing. Times
come from the events, never from the clock, so a replay rebuilds the same table.
A batch closes once it is published, every partition's end marker has been applied and
every expected sink has committed every partition; it closes once, at that event's time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from streams.api import Input, Output, Table, TableSpec
from topics.spec import BATCH_STATUS, BATCHES_CHANGELOG, EVENTS

SUBMITTED, PUBLISHED, CLOSED, FAILED = "submitted", "published", "closed", "failed"


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    status: str = SUBMITTED
    source: str = ""
    checksum: str = ""
    mode: str = ""
    sinks: tuple[str, ...] = ()
    segments: tuple[str, ...] = ()
    rows: int = 0
    rejected: int = 0
    partitions: int = 0
    partition_counts: tuple[int, ...] = ()
    applied: dict[str, int] = field(default_factory=dict)  # partition -> changes
    committed: dict[str, list[int]] = field(default_factory=dict)  # sink -> partitions
    locations: dict[str, str] = field(default_factory=dict)  # sink -> where its output is
    submitted_at: int | None = None
    published_at: int | None = None
    applied_at: int | None = None
    closed_at: int | None = None
    failed_at: int | None = None
    failed_step: str = ""
    error: str = ""
    updated_at: int | None = None
    # The options of the first submission (format, delimiter, mode, segment): with the
    # checksum, the identity of the request. Empty for batches from before it was kept.
    request: dict[str, str] = field(default_factory=dict)

    @property
    def changes(self) -> int:
        return sum(self.applied.values())

    @property
    def finished(self) -> bool:
        return self.status in (CLOSED, FAILED)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BatchStatus:
        raw = json.loads(text)
        raw["sinks"] = tuple(raw["sinks"])
        raw["partition_counts"] = tuple(raw["partition_counts"])
        raw["segments"] = tuple(raw.get("segments", ()))
        return cls(**raw)


BATCHES = TableSpec("batches", BatchStatus.to_json, BatchStatus.from_json)


def fold(status: BatchStatus | None, event: dict[str, Any]) -> BatchStatus | None:
    """The next status of a batch after `event`; None for an event before any submission."""
    kind, at = event["kind"], event["at_ms"]
    if kind == "submitted":
        if status is not None:
            return status  # a double-fired trigger: the first submission stands
        return BatchStatus(batch_id=event["batch_id"], source=event["source"],
                           checksum=event["checksum"], mode=event["mode"],
                           sinks=tuple(event["sinks"]), submitted_at=at, updated_at=at,
                           request=_request(event))
    if status is None or status.finished:
        return status
    if kind == "published":
        if status.status == PUBLISHED:
            return status
        status = replace(status, status=PUBLISHED, rows=event["rows"],
                         rejected=event["rejected"], partitions=len(event["partition_counts"]),
                         partition_counts=tuple(event["partition_counts"]),
                         segments=tuple(event["segments"]), published_at=at)
    elif kind == "partition_applied":
        key = str(event["partition"])
        if key in status.applied:
            return status
        applied = {**status.applied, key: event["changes"]}
        status = replace(status, applied=applied)
        if status.partitions and len(applied) == status.partitions:
            status = replace(status, applied_at=at)
    elif kind == "sink_committed":
        done = status.committed.get(event["sink"], [])
        if event["partition"] in done:
            return status
        committed = {**status.committed, event["sink"]: sorted([*done, event["partition"]])}
        locations = status.locations
        if event.get("location"):
            locations = {**locations, event["sink"]: event["location"]}
        status = replace(status, committed=committed, locations=locations)
    elif kind == "failed":
        if status.status == SUBMITTED:  # failed at import: keep what the importer counted
            status = replace(status, rows=event.get("rows", 0),
                             rejected=event.get("rejected", 0))
        return replace(status, status=FAILED, failed_at=at, failed_step=event["step"],
                       error=event["error"], updated_at=at)
    else:
        raise ValueError(f"unknown batch event kind {kind!r}")
    status = replace(status, updated_at=at)
    return _close_if_complete(status, at)


def _request(event: dict[str, Any]) -> dict[str, str]:
    # A submitted event carries the request's identity as JSON.
    text = event.get("request") or ""
    try:
        request = json.loads(text) if text.startswith("{") else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in request.items()} if isinstance(request, dict) else {}


def _close_if_complete(status: BatchStatus, at: int) -> BatchStatus:
    if status.status != PUBLISHED or len(status.applied) != status.partitions:
        return status
    everyone = set(range(status.partitions))
    if all(set(status.committed.get(sink, ())) >= everyone for sink in status.sinks):
        return replace(status, status=CLOSED, closed_at=at)
    return status


class PipelineState:
    name = "pipeline"
    input_topic = EVENTS
    changelog_topic = BATCHES_CHANGELOG
    tables = (BATCHES,)

    def process(self, tables: dict[str, Table[Any]], record: Input) -> list[Output]:
        event = record.value
        if event["kind"] == "sink_committed" and record.timestamp_ms > event["at_ms"]:
            # A sink stamps its event with its input's time (the end marker's); the event's
            # own time on the log is after the sink committed: a batch closes then, not
            # seconds before its last load finished. Log times replay the same.
            event = {**event, "at_ms": record.timestamp_ms}
        batches: Table[BatchStatus] = tables["batches"]
        before = batches.get(event["batch_id"])
        after = fold(before, event)
        if after is None or after == before:
            return []
        batches.set(after.batch_id, after)
        return [Output(BATCH_STATUS, "BatchStatus",
                       {"batch_id": after.batch_id, "status": after.status,
                        "json": after.to_json(), "source_position": record.position},
                       key=after.batch_id)]

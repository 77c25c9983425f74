"""How a batch is shown to people and scripts (`streams status`, its `--watch`, the page of
`streams serve` and its JSON API): the status as shown (a submitted batch whose import
process is gone is `interrupted`), per-partition progress, and the freshness of each
segment (time since the last batch naming it closed)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.spool import import_in_progress
from processors.pipeline_state import SUBMITTED, BatchStatus


def shown_status(s: BatchStatus, spool_dir: Path) -> tuple[str, str]:
    """(status, note): a submitted batch whose import process is gone is interrupted."""
    if s.status == SUBMITTED and not import_in_progress(spool_dir, s.batch_id):
        return "interrupted", (f"import stopped, submitted {age(s.submitted_at)} ago: run "
                               "the same command again to finish it")
    return s.status, s.error


def ts(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def age(ms: int | None, now_s: float | None = None) -> str:
    seconds = max(0.0, (time.time() if now_s is None else now_s) - (ms or 0) / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def as_dict(s: BatchStatus, spool_dir: Path) -> dict[str, Any]:
    """The batch's whole status (as `streams status --json`), its shown status and note."""
    raw = json.loads(s.to_json())
    shown, note = shown_status(s, spool_dir)
    raw.update(interrupted=shown == "interrupted", shown_status=shown, note=note,
               changes=s.changes)
    return raw


def partitions(s: BatchStatus) -> list[dict[str, Any]]:
    """Per partition: rows published, changes applied (None: not yet), and for each sink
    whether it committed the partition."""
    out = []
    for p in range(s.partitions):
        out.append({"partition": p,
                    "rows": s.partition_counts[p] if p < len(s.partition_counts) else 0,
                    "applied": s.applied.get(str(p)),
                    "sinks": {sink: p in s.committed.get(sink, []) for sink in s.sinks}})
    return out


def freshness(batches: list[BatchStatus]) -> list[dict[str, Any]]:
    """Per segment: the last closed batch naming it and when it closed, newest first."""
    last: dict[str, BatchStatus] = {}
    for s in batches:
        if s.status != "closed" or s.closed_at is None:
            continue
        for segment in s.segments:
            if segment not in last or (last[segment].closed_at or 0) < s.closed_at:
                last[segment] = s
    rows = [{"segment": seg, "batch_id": s.batch_id, "closed_at": s.closed_at}
            for seg, s in last.items()]
    return sorted(rows, key=lambda r: (-(r["closed_at"] or 0), r["segment"]))

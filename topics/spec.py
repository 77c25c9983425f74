"""Topic specs, read from `topics.toml` beside this file.

Besides partitions and schemas, a spec carries the topic's housekeeping config, Kafka's
topic configs by another name: `cleanup` (cleanup.policy), `retention_ms` (retention.ms),
`retention_bytes` (retention.bytes) and `segment_bytes` (the embedded log's segment size;
Kafka topics keep the broker's segment.bytes). The backends apply them when they create a
topic; an existing topic keeps the config it has, as on Kafka.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

CLEANUP_POLICIES = ("delete", "compact")
DAY_MS = 24 * 3600 * 1000
# The embedded log's segment size when a spec names none (Kafka's default is 1 GiB; smaller
# segments let retention free space sooner, and each compaction pass rewrites less).
DEFAULT_SEGMENT_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    schemas: tuple[str, ...]
    changelog: bool = False  # a state changelog: restored from on start
    description: str = ""
    cleanup: str = "delete"  # "delete" (retention) or "compact" (last record per key)
    retention_ms: int | None = None  # history older than this is deleted; None: kept forever
    retention_bytes: int | None = None  # per partition; None: no size limit
    segment_bytes: int = DEFAULT_SEGMENT_BYTES  # embedded: roll a new segment file past this

    def __post_init__(self) -> None:
        check_config(self.name, self.config())

    def config(self) -> dict[str, Any]:
        """The housekeeping config, as the embedded log stores it in topic.json."""
        return {"cleanup": self.cleanup, "retention_ms": self.retention_ms,
                "retention_bytes": self.retention_bytes, "segment_bytes": self.segment_bytes}


CONFIG_KEYS = ("cleanup", "retention_ms", "retention_bytes", "segment_bytes")


def check_config(topic: str, config: dict[str, Any]) -> None:
    """Raises ValueError naming the topic when a housekeeping setting is out of range."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"topic {topic}: unknown config {', '.join(unknown)}; "
                         f"expected {', '.join(CONFIG_KEYS)}")
    if config.get("cleanup", "delete") not in CLEANUP_POLICIES:
        raise ValueError(f"topic {topic}: cleanup must be one of {CLEANUP_POLICIES}, "
                         f"not {config['cleanup']!r}")
    for key in ("retention_ms", "retention_bytes"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"topic {topic}: {key} must be a positive integer or None "
                             f"(keep forever), not {value!r}")
    segment = config.get("segment_bytes", DEFAULT_SEGMENT_BYTES)
    if not isinstance(segment, int) or segment <= 0:
        raise ValueError(f"topic {topic}: segment_bytes must be a positive integer, "
                         f"not {segment!r}")


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def load_specs() -> dict[str, TopicSpec]:
    text = resources.files("topics").joinpath("topics.toml").read_text(encoding="utf-8")
    raw = tomllib.loads(text)["topics"]
    return {
        name: TopicSpec(
            name=name,
            partitions=int(body["partitions"]),
            schemas=tuple(body["schemas"]),
            changelog=bool(body.get("changelog", False)),
            description=str(body.get("description", "")),
            cleanup=str(body.get("cleanup", "delete")),
            # TOML has no null: a key left out means None (keep forever / no limit)
            retention_ms=_optional_int(body.get("retention_ms")),
            retention_bytes=_optional_int(body.get("retention_bytes")),
            segment_bytes=int(body.get("segment_bytes", DEFAULT_SEGMENT_BYTES)),
        )
        for name, body in raw.items()
    }


SPECS = load_specs()

ROWS = "audience.rows"
CHANGES = "audience.segment-changes"
SEGMENTS_CHANGELOG = "audience.segments-changelog"
DEAD_LETTER = "audience.dead-letter"
EVENTS = "pipeline.events"
BATCHES_CHANGELOG = "pipeline.batches-changelog"
BATCH_STATUS = "pipeline.batch-status"

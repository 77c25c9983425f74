"""Topic specs, read from `topics.toml` beside this file."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    schemas: tuple[str, ...]
    changelog: bool = False  # compacted on Kafka; restored from on start
    description: str = ""


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

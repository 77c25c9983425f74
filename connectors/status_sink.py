"""Mirrors batch status snapshots (`pipeline.batch-status`) into the warehouse's
`batch_status` table. Upserts by batch id, so re-reading a snapshot changes nothing."""

from __future__ import annotations

import json

from connectors.warehouses.base import Warehouse
from streams.api import Input, Output
from topics.spec import BATCH_STATUS

STATUS_COLUMNS = ("status", "rows", "rejected", "partitions", "submitted_at",
                  "published_at", "closed_at", "failed_at", "error")


class StatusTableSink:
    name = "warehouse-status"
    topic = BATCH_STATUS

    def __init__(self, warehouse: Warehouse):
        self.warehouse = warehouse

    def stamp(self, record: Input) -> tuple[int, int]:
        # Snapshots are re-emitted after a pipeline crash; the event position they came from
        # rises along the partition (events and snapshots are both keyed by batch id).
        return record.value["source_position"], 0

    def process(self, record: Input) -> list[Output]:
        status = json.loads(record.value["json"])
        row = {column: status.get(column) for column in STATUS_COLUMNS}
        row["batch_id"] = status["batch_id"]
        row["detail"] = record.value["json"]
        self.warehouse.upsert_batch_status([row])
        return []

    def idle(self, partition: int) -> bool:
        return True

    def reset(self, partition: int) -> None:
        pass

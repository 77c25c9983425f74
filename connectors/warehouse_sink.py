"""Warehouse sink: stages each chunk of changes in bulk, then merges a (batch, partition)
in one transaction that also records it in the load ledger, so it is applied once."""

from __future__ import annotations

from connectors.change_set import ChangeSet
from connectors.warehouse import DuckDBWarehouse


class WarehouseSink:
    name = "warehouse"

    def __init__(self, warehouse: DuckDBWarehouse):
        self.warehouse = warehouse

    def write_chunk(self, changes: ChangeSet) -> None:
        self.warehouse.stage(changes)

    def close_partition(self, batch_id: str, partition: int, partitions: int) -> str:
        self.warehouse.merge(batch_id, partition)
        return f"duckdb://{self.warehouse.path.resolve()}#segment_members"

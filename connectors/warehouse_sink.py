"""Warehouse sink: stages each chunk of changes in bulk, then at each end marker merges
the partition's staged changes up to it, in log order, in one transaction that also
records the (batch, partition) in the load ledger, so each change is applied once."""

from __future__ import annotations

from connectors.change_set import ChangeSet
from connectors.warehouses.base import Warehouse


class WarehouseSink:
    name = "warehouse"

    def __init__(self, warehouse: Warehouse):
        self.warehouse = warehouse

    def write_chunk(self, changes: ChangeSet) -> None:
        self.warehouse.stage(changes)

    def close_partition(self, batch_id: str, partition: int, partitions: int,
                        end_position: int) -> str:
        self.warehouse.merge(batch_id, partition, end_position)
        return self.warehouse.location()

    def reset_partition(self, partition: int) -> None:
        self.warehouse.drop_staged(partition)

"""Mirrors batch status snapshots (`pipeline.batch-status`) into a DynamoDB table, one item
per batch, for dashboards and triggers (`--status-table`).

Each put is conditional on the position of the event the snapshot reflects (its
`source_position`, rising along the batch's partition of the events topic): a snapshot
re-read after a crash, re-emitted by the pipeline processor, or written late by a zombie
worker never moves an item backwards.

The position is kept as `source_key`, its key (topics/positions.py: a string of any width
that DynamoDB's bytewise string order compares as the positions), and, when it is below
10**20, also as the number `source_position` (what items written before wide positions
hold alone; a DynamoDB number has 38 digits at most, a Kinesis position far more). An item
without `source_key` is an older one: the number decides, and a wide position is above it.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from connectors.dynamo import ensure_table
from streams.api import Input, Output
from topics import positions
from topics.spec import BATCH_STATUS

KEY = "batch_id"
# Top-level attributes (the whole status is in `detail` too, as JSON).
ATTRIBUTES = ("status", "source", "checksum", "mode", "segments", "rows", "rejected",
              "partitions", "partition_counts", "locations", "submitted_at", "published_at",
              "applied_at", "closed_at", "failed_at", "failed_step", "error", "updated_at")


def status_item(status: dict[str, Any], position: int, detail: str) -> dict[str, Any]:
    """The item of a batch status (DynamoDB's typed JSON)."""
    from boto3.dynamodb.types import TypeSerializer

    plain = {name: status.get(name) for name in ATTRIBUTES}
    plain["changes"] = sum((status.get("applied") or {}).values())
    plain = {name: value for name, value in plain.items() if value is not None}
    serialize = TypeSerializer().serialize
    item = {name: serialize(_decimals(value)) for name, value in plain.items()}
    item[KEY] = {"S": status[KEY]}
    if is_narrow(position):
        item["source_position"] = {"N": str(position)}
    item["source_key"] = {"S": positions.key(position)}
    item["detail"] = {"S": detail}
    return item


def _decimals(value: Any) -> Any:
    # DynamoDB numbers are Decimals to boto3; floats are refused.
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _decimals(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_decimals(v) for v in value]
    return value


def is_narrow(position: int) -> bool:
    """Held by a DynamoDB number as well (and by an item of an older writer)."""
    return 0 <= position < 10**positions.NARROW_DIGITS


class StatusTable:
    def __init__(self, name: str, client: Any = None):
        self.name = name
        self.client = ensure_table(name, KEY, client, what="--status-table")

    def put(self, status: dict[str, Any], position: int, detail: str) -> bool:
        """Writes the item unless one from this position or a later one is there; False
        when it was (nothing changed)."""
        values = {":k": {"S": positions.key(position)}}
        older = "attribute_not_exists(source_key)"  # an item of an older writer: narrow
        if is_narrow(position):
            older = f"({older} AND source_position < :p)"
            values[":p"] = {"N": str(position)}
        try:
            self.client.put_item(
                TableName=self.name, Item=status_item(status, position, detail),
                ConditionExpression=f"attribute_not_exists(#k) OR source_key < :k OR {older}",
                ExpressionAttributeNames={"#k": KEY}, ExpressionAttributeValues=values)
        except Exception as exc:
            from connectors.aws import error_code

            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def get(self, batch_id: str) -> dict[str, Any] | None:
        from boto3.dynamodb.types import TypeDeserializer

        item = self.client.get_item(TableName=self.name, Key={KEY: {"S": batch_id}},
                                    ConsistentRead=True).get("Item")
        if item is None:
            return None
        deserialize = TypeDeserializer().deserialize
        return {name: deserialize(value) for name, value in item.items()}


class DynamoStatusSink:
    name = "status-table"
    topic = BATCH_STATUS

    def __init__(self, table: StatusTable):
        self.table = table

    def stamp(self, record: Input) -> tuple[int, int]:
        return record.value["source_position"], 0

    def process(self, record: Input) -> list[Output]:
        detail = record.value["json"]
        self.table.put(json.loads(detail), record.value["source_position"], detail)
        return []

    def idle(self, partition: int) -> bool:
        return True  # every put is done when process returns

    def reset(self, partition: int) -> None:
        pass

"""Mirrors batch status snapshots (`pipeline.batch-status`) into a DynamoDB table, one item
per batch, for dashboards and triggers (`--status-table`).

Each write is conditional on the position of the event the snapshot reflects (its
`source_position`, rising along the batch's partition of the events topic): a snapshot
re-read after a crash, re-emitted by the pipeline processor, or written late by a zombie
worker never moves an item backwards.

The position is kept as `source_key`, its key (topics/positions.py: a string of any width
that DynamoDB's bytewise string order compares as the positions), and, when it is below
10**20, also as the number `source_position` (what items written before wide positions
hold alone; a DynamoDB number has 38 digits at most, a Kinesis position far more). An item
without `source_key` is an older one: the number decides, and a wide position is above it.

The deployment's state machine writes into the same items (deploy/lambdas): the trigger's
`submitted` record before the pipeline has seen the batch (`source_position` -1), and one
`step_<name>` map per step (phase, time, error). The mirror updates its own attributes only
(UpdateItem, never a whole-item put), so those records survive its writes.
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
        """Writes the item's mirrored attributes unless they are from this position or a
        later one already; False when they were (nothing changed)."""
        item = status_item(status, position, detail)
        del item[KEY]
        names = {f"#a{i}": name for i, name in enumerate(item)}
        values = {f":v{i}": value for i, value in enumerate(item.values())}
        values[":k"] = {"S": positions.key(position)}
        # No source_key: the trigger's record (position -1) or an older writer's (narrow).
        older = "attribute_not_exists(source_key)"
        expression = "SET " + ", ".join(f"#a{i} = :v{i}" for i in range(len(item)))
        if is_narrow(position):
            older = f"({older} AND source_position < :p)"
            values[":p"] = {"N": str(position)}
        else:  # a number it no longer is
            expression += " REMOVE source_position"
        return self._update(
            status[KEY], expression,
            f"attribute_not_exists(#k) OR source_key < :k OR {older}",
            {**names, "#k": KEY}, values)

    def submit(self, batch_id: str, source: str, at_ms: int, step: dict[str, Any]) -> bool:
        """The trigger's record of a batch before the pipeline has seen it (status
        `submitted`, below every event position) and its `step_submit`; False when the
        batch's item was there already (the attributes the mirror wrote are kept)."""
        created = self._update(
            batch_id, "SET #s = :s, #src = :src, submitted_at = :at, source_position = :p",
            "attribute_not_exists(#k)", {"#s": "status", "#src": "source", "#k": KEY},
            {":s": {"S": "submitted"}, ":src": {"S": source}, ":at": {"N": str(at_ms)},
             ":p": {"N": "-1"}})
        self.record_step(batch_id, "submit", step)
        return created

    def record_step(self, batch_id: str, step: str, record: dict[str, Any]) -> None:
        """Sets `step_<step>` (a map: phase, at, error, ...) and, for a failed step,
        `execution_failed_step` and `execution_error` beside the pipeline's own status."""
        from boto3.dynamodb.types import TypeSerializer

        serialize = TypeSerializer().serialize
        names, values = {"#step": f"step_{step}"}, {":step": serialize(_decimals(record))}
        sets = ["#step = :step"]
        if record.get("phase") == "failed":
            names.update({"#fs": "execution_failed_step", "#fe": "execution_error"})
            values.update({":fs": {"S": step}, ":fe": {"S": str(record.get("error", ""))}})
            sets += ["#fs = :fs", "#fe = :fe"]
        self._update(batch_id, "SET " + ", ".join(sets), None, names, values)

    def _update(self, batch_id: str, expression: str, condition: str | None,
                names: dict[str, str], values: dict[str, Any]) -> bool:
        request: dict[str, Any] = dict(
            TableName=self.name, Key={KEY: {"S": batch_id}}, UpdateExpression=expression,
            ExpressionAttributeNames=names, ExpressionAttributeValues=values)
        if condition:
            request["ConditionExpression"] = condition
        try:
            self.client.update_item(**request)
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

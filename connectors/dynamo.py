"""DynamoDB tables of the pipeline: created on first use (on demand), checked otherwise.

Two tables use it: the batch status mirror (connectors/dynamo_status.py, `--status-table`)
and the triggers' double-fire guard (`claim_object` below), each keyed by one string.
"""

from __future__ import annotations

from typing import Any

from connectors import aws

ACTIVE_WAIT = {"Delay": 1, "MaxAttempts": 120}  # bounded: two minutes at most


def ensure_table(name: str, key: str, client: Any = None, what: str = "table") -> Any:
    """The client, once table `name` exists with `key` (a string) as its only key: created
    (PAY_PER_REQUEST) when missing; ValueError naming the table when it has another key,
    or when it cannot be used (no credentials or access, no region, no endpoint)."""
    try:
        return _ensure_table(name, key, client, what)
    except ValueError:
        raise
    except Exception as exc:
        if not aws.is_aws_error(exc):
            raise
        raise ValueError(f"{what} {name}: cannot use the DynamoDB table ({aws.reason(exc)}); "
                         "expected one this process's AWS credentials may describe, create "
                         "and write to") from None


def _ensure_table(name: str, key: str, client: Any, what: str) -> Any:
    client = client if client is not None else aws.client("dynamodb")
    try:
        table = client.describe_table(TableName=name)["Table"]
    except Exception as exc:
        if aws.error_code(exc) != "ResourceNotFoundException":
            raise
        try:
            client.create_table(
                TableName=name, BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}])
        except Exception as exc2:
            if aws.error_code(exc2) != "ResourceInUseException":  # another process won
                raise
        client.get_waiter("table_exists").wait(TableName=name, WaiterConfig=ACTIVE_WAIT)
        table = client.describe_table(TableName=name)["Table"]
    schema = [(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]]
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
    if schema != [(key, "HASH")] or types.get(key) != "S":
        found = ", ".join(f"{n} ({kind.lower()}, {types.get(n, '?')})" for n, kind in schema)
        raise ValueError(f"{what} {name}: the DynamoDB table exists with key {found}; "
                         f"expected {key} (hash, S) as its only key: choose another table "
                         "name or delete that table")
    return client


def claim_object(table: str, bucket: str, key: str, version: str,
                 client: Any = None, **attributes: str) -> bool:
    """The double-fire guard of a trigger: True the first time an object version (S3
    version id, or its ETag / EventBridge sequencer where versioning is off) is claimed,
    False every time after, on any machine (a conditional put). `attributes` (a batch id,
    the claimer) are stored with the claim."""
    client = client if client is not None else aws.client("dynamodb")
    item = {"object_id": {"S": object_id(bucket, key, version)},
            "bucket": {"S": bucket}, "key": {"S": key}, "version": {"S": version},
            **{name: {"S": value} for name, value in attributes.items()}}
    try:
        client.put_item(TableName=table, Item=item,
                        ConditionExpression="attribute_not_exists(object_id)")
    except Exception as exc:
        if aws.error_code(exc) == "ConditionalCheckFailedException":
            return False
        raise
    return True


def object_id(bucket: str, key: str, version: str) -> str:
    """One string per object version: s3://bucket/key#version."""
    return f"s3://{bucket}/{key}#{version}"


def ensure_guard_table(name: str, client: Any = None) -> Any:
    return ensure_table(name, "object_id", client, what="trigger guard table")


def claim_of(table: str, bucket: str, key: str, version: str,
             client: Any = None) -> dict[str, str] | None:
    """The stored claim of an object version (its string attributes), None if unclaimed."""
    client = client if client is not None else aws.client("dynamodb")
    item = client.get_item(TableName=table, ConsistentRead=True,
                           Key={"object_id": {"S": object_id(bucket, key, version)}}).get("Item")
    if item is None:
        return None
    return {name: value["S"] for name, value in item.items() if "S" in value}

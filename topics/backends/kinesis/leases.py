"""A group's lease table in DynamoDB, on the KCL's schema (DynamoDBLeaseSerializer):

    leaseKey                      "<stream name>:<shard id>" (one table serves the group's
                                  streams, as the KCL's multi-stream mode keys them)
    leaseOwner                    the member holding it; absent: free to take at once
    leaseCounter (N)              +1 on every take, renewal, checkpoint and release
    checkpoint                    TRIM_HORIZON, a sequence number, or SHARD_END
    checkpointSubSequenceNumber   (N) with `checkpoint`: the shard-level checkpoint
    ownerSwitchesSinceCheckpoint  (N)
    parentShardId                 (SS) the shard's parents, if any
    startingHashKey, endingHashKey
our own attributes:
    streamName, shardId
    leaseRequestedBy              a member that wants the lease (balancing): its owner
                                  hands it over cleanly (revoke, commit, release) at
                                  its next cycle; unanswered for the failover time, the
                                  member takes it as the KCL steals
    partitionCommits              (M) virtual partition -> {"position": S, "metadata": S}:
                                  the runtime's commits of the virtual partitions the shard
                                  carries; positions are decimal strings (any width)

Members: an item `member:<name>` per running member (leaseOwner = the member, its
leaseCounter bumped at every renewal round, deleted on close), so a member that holds no
lease yet (more members than shards) is still seen live: it counts for the fair share and
for `active_members`. `scan` leaves these items out unless asked.

Every write to a held lease is an UpdateItem conditional on the leaseCounter last seen (and,
but for a take, on leaseOwner being us): a worker that lost its lease can neither renew nor
checkpoint nor commit. Nothing here reads a clock: expiry is judged by the consumer.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

MEMBER_PREFIX = "member:"
SHARD_END = "SHARD_END"
TRIM_HORIZON = "TRIM_HORIZON"
TABLE_WAIT_S = 120.0


@dataclass(frozen=True)
class Commit:
    position: int | None
    metadata: str = ""


@dataclass(frozen=True)
class Lease:
    key: str
    stream: str
    shard_id: str
    owner: str | None
    counter: int
    checkpoint: str = TRIM_HORIZON
    sub: int = 0
    parents: tuple[str, ...] = ()
    start: int = 0
    end: int = 0
    switches: int = 0
    commits: dict[int, Commit] = field(default_factory=dict)
    requested_by: str | None = None  # a member asking the owner to hand it over

    @property
    def finished(self) -> bool:
        return self.checkpoint == SHARD_END


def lease_key(stream: str, shard_id: str) -> str:
    return f"{stream}:{shard_id}"


def _from_item(item: dict[str, Any]) -> Lease:
    def s(name: str, default: str = "") -> str:
        return str(item[name]["S"]) if name in item else default

    def n(name: str) -> int:
        return int(item[name]["N"]) if name in item else 0

    commits = {}
    for v, body in item.get("partitionCommits", {}).get("M", {}).items():
        entry = body["M"]
        position = entry.get("position", {}).get("S")
        commits[int(v)] = Commit(int(position) if position else None,
                                 entry.get("metadata", {}).get("S", ""))
    return Lease(key=s("leaseKey"), stream=s("streamName"), shard_id=s("shardId"),
                 owner=s("leaseOwner") or None, counter=n("leaseCounter"),
                 checkpoint=s("checkpoint", TRIM_HORIZON), sub=n("checkpointSubSequenceNumber"),
                 parents=tuple(sorted(item.get("parentShardId", {}).get("SS", []))),
                 start=int(s("startingHashKey", "0")), end=int(s("endingHashKey", "0")),
                 switches=n("ownerSwitchesSinceCheckpoint"), commits=commits,
                 requested_by=s("leaseRequestedBy") or None)


def _commit_value(commit: Commit) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"S": commit.metadata}}
    if commit.position is not None:
        body["position"] = {"S": str(commit.position)}
    return {"M": body}


class LeaseTable:
    def __init__(self, client: Any, name: str):
        self.client = client
        self.name = name
        self._errors = client.exceptions

    # -- the table ------------------------------------------------------------------------
    def exists(self) -> bool:
        try:
            self.client.describe_table(TableName=self.name)
            return True
        except self._errors.ResourceNotFoundException:
            return False

    def ensure(self) -> None:
        try:
            status = self.client.describe_table(TableName=self.name)["Table"]["TableStatus"]
        except self._errors.ResourceNotFoundException:
            with contextlib.suppress(self._errors.ResourceInUseException):  # raced: fine
                self.client.create_table(
                    TableName=self.name, BillingMode="PAY_PER_REQUEST",
                    AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
                    KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}])
            status = "CREATING"
        deadline = time.monotonic() + TABLE_WAIT_S
        while status != "ACTIVE":
            if time.monotonic() > deadline:
                raise RuntimeError(f"lease table {self.name} not ACTIVE after "
                                   f"{TABLE_WAIT_S:.0f}s")
            time.sleep(0.2)
            status = self.client.describe_table(TableName=self.name)["Table"]["TableStatus"]

    def scan(self, members: bool = False) -> dict[str, Lease]:
        """The leases (and with `members`, the member items) by key."""
        out: dict[str, Lease] = {}
        args: dict[str, Any] = {"TableName": self.name, "ConsistentRead": True}
        while True:
            page = self.client.scan(**args)
            for item in page["Items"]:
                lease = _from_item(item)
                if members or not lease.key.startswith(MEMBER_PREFIX):
                    out[lease.key] = lease
            if "LastEvaluatedKey" not in page:
                return out
            args["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def get(self, key: str) -> Lease | None:
        item = self.client.get_item(TableName=self.name, Key={"leaseKey": {"S": key}},
                                    ConsistentRead=True).get("Item")
        return _from_item(item) if item else None

    # -- writes ---------------------------------------------------------------------------
    def create(self, lease: Lease) -> bool:
        """Puts a new lease unless one with its key exists; True if this call made it."""
        item: dict[str, Any] = {
            "leaseKey": {"S": lease.key}, "streamName": {"S": lease.stream},
            "shardId": {"S": lease.shard_id}, "leaseCounter": {"N": str(lease.counter)},
            "checkpoint": {"S": lease.checkpoint},
            "checkpointSubSequenceNumber": {"N": str(lease.sub)},
            "ownerSwitchesSinceCheckpoint": {"N": str(lease.switches)},
            "startingHashKey": {"S": str(lease.start)}, "endingHashKey": {"S": str(lease.end)},
            "partitionCommits": {"M": {str(v): _commit_value(c)
                                       for v, c in lease.commits.items()}},
        }
        if lease.owner:
            item["leaseOwner"] = {"S": lease.owner}
        if lease.parents:
            item["parentShardId"] = {"SS": list(lease.parents)}
        try:
            self.client.put_item(TableName=self.name, Item=item,
                                 ConditionExpression="attribute_not_exists(leaseKey)")
            return True
        except self._errors.ConditionalCheckFailedException:
            return False

    def _update(self, lease: Lease, sets: list[str], values: dict[str, Any],
                names: dict[str, str] | None = None, removes: tuple[str, ...] = (),
                owned_by: str | None = None) -> Lease | None:
        """SET leaseCounter + 1 and `sets`, conditional on the counter seen (and owner);
        the new lease, or None when the condition failed."""
        expression = "SET " + ", ".join(["leaseCounter = :next", *sets])
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        condition = "leaseCounter = :seen"
        values = {**values, ":seen": {"N": str(lease.counter)},
                  ":next": {"N": str(lease.counter + 1)}}
        if owned_by is not None:
            condition += " AND leaseOwner = :me"
            values[":me"] = {"S": owned_by}
        args: dict[str, Any] = {
            "TableName": self.name, "Key": {"leaseKey": {"S": lease.key}},
            "UpdateExpression": expression, "ConditionExpression": condition,
            "ExpressionAttributeValues": values, "ReturnValues": "ALL_NEW"}
        if names:
            args["ExpressionAttributeNames"] = names
        try:
            return _from_item(self.client.update_item(**args)["Attributes"])
        except self._errors.ConditionalCheckFailedException:
            return None

    def take(self, lease: Lease, owner: str) -> Lease | None:
        return self._update(lease, ["leaseOwner = :owner",
                                    "ownerSwitchesSinceCheckpoint = :switches"],
                            {":owner": {"S": owner},
                             ":switches": {"N": str(lease.switches + 1)}},
                            removes=("leaseRequestedBy",))

    def request(self, lease: Lease, member: str) -> bool:
        """Asks the owner to hand the lease over; the counter is left alone (the owner's
        renewals go on). False if the owner changed meanwhile."""
        try:
            self.client.update_item(
                TableName=self.name, Key={"leaseKey": {"S": lease.key}},
                UpdateExpression="SET leaseRequestedBy = :me",
                ConditionExpression="leaseOwner = :owner",
                ExpressionAttributeValues={":me": {"S": member},
                                           ":owner": {"S": lease.owner or ""}})
            return True
        except self._errors.ConditionalCheckFailedException:
            return False

    def renew(self, lease: Lease, owner: str) -> Lease | None:
        return self._update(lease, [], {}, owned_by=owner)

    def release(self, lease: Lease, owner: str) -> Lease | None:
        return self._update(lease, [], {}, removes=("leaseOwner", "leaseRequestedBy"),
                            owned_by=owner)

    def checkpoint(self, lease: Lease, owner: str, checkpoint: str, sub: int,
                   commits: dict[int, Commit]) -> Lease | None:
        """Writes the shard checkpoint and these virtual partitions' commits, fenced."""
        sets = ["checkpoint = :cp", "checkpointSubSequenceNumber = :sub",
                "ownerSwitchesSinceCheckpoint = :zero"]
        values: dict[str, Any] = {":cp": {"S": checkpoint}, ":sub": {"N": str(sub)},
                                  ":zero": {"N": "0"}}
        names: dict[str, str] = {}
        for i, (v, commit) in enumerate(sorted(commits.items())):
            names[f"#v{i}"] = str(v)
            sets.append(f"partitionCommits.#v{i} = :c{i}")
            values[f":c{i}"] = _commit_value(commit)
        return self._update(lease, sets, values, names or None, owned_by=owner)

    def put_commits(self, key: str, commits: dict[int, Commit]) -> bool:
        """Sets commits on a lease we do not hold (a handover into a child lease that is not
        processed yet, or a group reset while no worker runs). False if it is gone."""
        if not commits:
            return True
        names = {f"#v{i}": str(v) for i, v in enumerate(sorted(commits))}
        values = {f":c{i}": _commit_value(commits[v]) for i, v in enumerate(sorted(commits))}
        try:
            self.client.update_item(
                TableName=self.name, Key={"leaseKey": {"S": key}},
                UpdateExpression="SET " + ", ".join(f"partitionCommits.#v{i} = :c{i}"
                                                    for i in range(len(commits))),
                ConditionExpression="attribute_exists(leaseKey)",
                ExpressionAttributeNames=names, ExpressionAttributeValues=values)
            return True
        except self._errors.ConditionalCheckFailedException:
            return False

    def hand_over(self, parent: Lease, owner: str, child_key: str,
                  commits: dict[int, Commit]) -> bool:
        """Copies a finished parent's commits into its child, in one transaction with a
        check that we still hold the parent (counter and owner): a worker that lost the
        parent meanwhile cannot overwrite what the parent's new owner handed over."""
        if not commits:
            return True
        names = {f"#v{i}": str(v) for i, v in enumerate(sorted(commits))}
        values = {f":c{i}": _commit_value(commits[v]) for i, v in enumerate(sorted(commits))}
        try:
            self.client.transact_write_items(TransactItems=[
                {"ConditionCheck": {
                    "TableName": self.name, "Key": {"leaseKey": {"S": parent.key}},
                    "ConditionExpression": "leaseCounter = :seen AND leaseOwner = :me",
                    "ExpressionAttributeValues": {":seen": {"N": str(parent.counter)},
                                                  ":me": {"S": owner}}}},
                {"Update": {
                    "TableName": self.name, "Key": {"leaseKey": {"S": child_key}},
                    "UpdateExpression": "SET " + ", ".join(
                        f"partitionCommits.#v{i} = :c{i}" for i in range(len(commits))),
                    "ConditionExpression": "attribute_exists(leaseKey)",
                    "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}},
            ])
            return True
        except self._errors.TransactionCanceledException:
            return False

    def beat(self, member: str) -> None:
        """Bumps the member's own item (made on first use)."""
        self.client.update_item(
            TableName=self.name, Key={"leaseKey": {"S": MEMBER_PREFIX + member}},
            UpdateExpression="SET leaseOwner = :me ADD leaseCounter :one",
            ExpressionAttributeValues={":me": {"S": member}, ":one": {"N": "1"}})

    def leave(self, member: str) -> None:
        self.client.delete_item(TableName=self.name,
                                Key={"leaseKey": {"S": MEMBER_PREFIX + member}})

    def delete(self, lease: Lease) -> bool:
        try:
            self.client.delete_item(TableName=self.name, Key={"leaseKey": {"S": lease.key}},
                                    ConditionExpression="leaseCounter = :seen",
                                    ExpressionAttributeValues={
                                        ":seen": {"N": str(lease.counter)}})
            return True
        except self._errors.ConditionalCheckFailedException:
            return False


def with_commits(lease: Lease, commits: dict[int, Commit]) -> Lease:
    return replace(lease, commits={**lease.commits, **commits})

"""How far a lease's checkpoint is behind its shard's tip, in milliseconds (Kinesis has no
message count per shard to subtract: GetRecords' MillisBehindLatest is the lag the KCL and
CloudWatch report).

Read on demand for `streams topics`, from the checkpoint in the lease table, so it is the lag
of what the group has committed, also while no member runs; it costs one GetShardIterator
and one GetRecords of a single record per lease (out of the shard's 5 reads a second)."""

from __future__ import annotations

import logging
from typing import Any

from topics.backends.kinesis.leases import SHARD_END, TRIM_HORIZON, Lease

log_ = logging.getLogger(__name__)


def millis_behind(client: Any, stream: str, lease: Lease) -> int | None:
    """The lease's checkpoint's distance from the tip of its shard in ms: 0 once the shard
    is finished (SHARD_END) or the checkpoint is at the tip; None when Kinesis does not say
    (the shard is gone, the checkpoint trimmed, or reads throttled)."""
    if lease.checkpoint == SHARD_END:
        return 0
    args: dict[str, Any] = {"StreamName": stream, "ShardId": lease.shard_id}
    if lease.checkpoint == TRIM_HORIZON:
        args["ShardIteratorType"] = TRIM_HORIZON
    else:  # a sequence number: what follows it is not yet processed
        args.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                    StartingSequenceNumber=lease.checkpoint)
    errors = client.exceptions
    try:
        iterator = client.get_shard_iterator(**args)["ShardIterator"]
        answer = client.get_records(ShardIterator=iterator, Limit=1)
    except (errors.ResourceNotFoundException, errors.InvalidArgumentException,
            errors.ProvisionedThroughputExceededException) as error:
        log_.info("%s %s: no lag read (%s)", stream, lease.shard_id, error)
        return None
    behind = answer.get("MillisBehindLatest")
    return None if behind is None else int(behind)

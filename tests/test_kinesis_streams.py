"""Streams as Kinesis shows them where kinesalite cannot: on-demand streams (moto's server
has the stream mode), and the paged answers of ListShards and ListTagsForStream (botocore's
Stubber, which checks each request against the service's model: Kinesis refuses a
StreamName beside a NextToken, a rule moto's paging does not keep)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from tests.aws_server import aws_env, moto_endpoint, unique_name
from topics.backends.kinesis.options import KinesisOptions
from topics.backends.kinesis.streams import PARTITIONS_TAG, Streams
from topics.log import TopicError
from topics.spec import TopicSpec

__all__ = ["aws_env", "moto_endpoint"]  # fixtures, used by name


def _shard(index: int, start: int, end: int) -> dict[str, Any]:
    return {"ShardId": f"shardId-{index:012d}",
            "HashKeyRange": {"StartingHashKey": str(start), "EndingHashKey": str(end)},
            "SequenceNumberRange": {"StartingSequenceNumber": str(10**20 + index)}}


def test_an_on_demand_stream_is_created_tagged_and_listed(aws_env: dict[str, str]) -> None:
    client = boto3.client("kinesis")
    prefix = unique_name("od") + "."
    streams = Streams(client, KinesisOptions(prefix=prefix, on_demand=True))
    streams.ensure([TopicSpec("audience.rows", 8, ("AudienceRows",))])
    summary = client.describe_stream_summary(
        StreamName=f"{prefix}audience.rows")["StreamDescriptionSummary"]
    assert summary["StreamModeDetails"] == {"StreamMode": "ON_DEMAND"}
    assert Streams(client, KinesisOptions(prefix=prefix)).partition_count("audience.rows") == 8
    shards = streams.shards("audience.rows")
    assert shards and [s.index for s in shards] == sorted(s.index for s in shards)
    assert min(s.start for s in shards) == 0 and max(s.end for s in shards) == 2**128 - 1
    with pytest.raises(TopicError, match="has 8 virtual partitions"):
        Streams(client, KinesisOptions(prefix=prefix, on_demand=True)).ensure(
            [TopicSpec("audience.rows", 4, ("AudienceRows",))])


def test_shards_are_read_page_by_page_with_the_token_alone() -> None:
    client = boto3.client("kinesis", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    half = 2**127
    with Stubber(client) as stub:
        stub.add_response("list_shards", {"Shards": [_shard(0, 0, half - 1)],
                                          "NextToken": "page-2"}, {"StreamName": "p.t"})
        stub.add_response("list_shards", {"Shards": [_shard(1, half, 2**128 - 1)]},
                          {"NextToken": "page-2"})
        shards = Streams(client, KinesisOptions(prefix="p.")).shards("t")
        stub.assert_no_pending_responses()
    assert [(s.id, s.start) for s in shards] == [("shardId-000000000000", 0),
                                                 ("shardId-000000000001", half)]


def test_the_partition_tag_is_found_past_the_first_page_of_tags() -> None:
    client = boto3.client("kinesis", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    team = [{"Key": f"team.{i:02d}", "Value": "x"} for i in range(10)]
    with Stubber(client) as stub:
        stub.add_response("list_tags_for_stream", {"Tags": team, "HasMoreTags": True},
                          {"StreamName": "p.t"})
        stub.add_response("list_tags_for_stream",
                          {"Tags": [{"Key": PARTITIONS_TAG, "Value": "6"}],
                           "HasMoreTags": False},
                          {"StreamName": "p.t", "ExclusiveStartTagKey": "team.09"})
        assert Streams(client, KinesisOptions(prefix="p.")).partition_count("t") == 6
        stub.assert_no_pending_responses()

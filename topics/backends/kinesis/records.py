"""Reading a shard: GetRecords, KPL deaggregation, envelopes decoded into Messages.

A `ShardCursor` reads one shard from after a position (or from TRIM_HORIZON) and tells when
the shard has ended (a closed shard read to its end: no next iterator). On resume it asks for
AT_SEQUENCE_NUMBER of the position's record and drops every sub-record at or below the
position, as the KCL does with its (sequence, sub-sequence) checkpoints.

Deaggregation (aws_kinesis_agg.deaggregator): sub-records of an aggregate come back with
their data base64-encoded, plain records with their raw bytes. A sub-record whose explicit
hash key lies outside the shard's range is dropped with a warning, as the KCL does
(AggregatorUtil): a producer that aggregated across shards put it there, and the consumer
of the shard that owns that key will never see it; our producer sends such sub-records again
(producer.py), so dropping them loses nothing and duplicates nothing.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aws_kinesis_agg.deaggregator import iter_deaggregate_records

from topics.backends.kinesis.envelope import EnvelopeError, decode
from topics.backends.kinesis.positions import pack, unpack
from topics.backends.kinesis.streams import Shard
from topics.log import Message

log_ = logging.getLogger(__name__)

GET_LIMIT = 10_000
THROTTLE_SLEEP_S = 0.2


@dataclass
class Batch:
    messages: list[Message]
    ended: bool  # the shard is closed and was read to its end
    behind_ms: int  # MillisBehindLatest of the answer (0: at the tip)


class ShardCursor:
    def __init__(self, client: Any, stream: str, topic: str, shard: Shard,
                 after: int | None = None, limit: int = GET_LIMIT):
        self.client = client
        self.stream = stream
        self.topic = topic
        self.shard = shard
        self.after = after if after is not None and unpack(after).shard == shard.index \
            else None  # an older shard's position: this shard is read from its start
        self.limit = limit
        self.ended = False
        self.behind_ms: int | None = None
        self.dropped = 0  # sub-records outside the shard's range (KCL: dropped)
        self.foreign = 0  # records that are no message envelope
        self._iterator: str | None = None

    def _iterator_after(self, position: int | None) -> str:
        args: dict[str, Any] = {"StreamName": self.stream, "ShardId": self.shard.id}
        if position is None:
            args["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            args["ShardIteratorType"] = "AT_SEQUENCE_NUMBER"
            args["StartingSequenceNumber"] = str(unpack(position).sequence)
        try:
            return str(self.client.get_shard_iterator(**args)["ShardIterator"])
        except self.client.exceptions.InvalidArgumentException:
            if position is None:
                raise
            # The record is gone (retention trimmed it): everything after it that is left
            # starts at the shard's trim horizon (what lies at or below it is dropped).
            log_.warning("%s %s: record %s is no longer in the stream; reading from the "
                         "oldest record left", self.stream, self.shard.id,
                         unpack(position).sequence)
            args = {"StreamName": self.stream, "ShardId": self.shard.id,
                    "ShardIteratorType": "TRIM_HORIZON"}
            return str(self.client.get_shard_iterator(**args)["ShardIterator"])

    def start_at(self, position: int) -> None:
        """Reads from the record of `position` (its sub-records too), not after it."""
        self.after = None
        self._iterator = str(self.client.get_shard_iterator(
            StreamName=self.stream, ShardId=self.shard.id, ShardIteratorType="AT_SEQUENCE_NUMBER",
            StartingSequenceNumber=str(unpack(position).sequence))["ShardIterator"])

    def start_at_time(self, since_ms: int) -> None:
        """Reads from the first record that arrived at or after `since_ms` (AT_TIMESTAMP)."""
        self.after = None
        self._iterator = str(self.client.get_shard_iterator(
            StreamName=self.stream, ShardId=self.shard.id, ShardIteratorType="AT_TIMESTAMP",
            Timestamp=since_ms / 1000)["ShardIterator"])

    def fetch(self) -> Batch:
        """One GetRecords call (none once the shard has ended)."""
        if self.ended:
            return Batch([], True, 0)
        if self._iterator is None:
            self._iterator = self._iterator_after(self.after)
        try:
            answer = self.client.get_records(ShardIterator=self._iterator, Limit=self.limit)
        except self.client.exceptions.ExpiredIteratorException:
            self._iterator = None  # idle past 5 minutes: start again after the last one
            return Batch([], False, self.behind_ms or 0)
        except self.client.exceptions.ProvisionedThroughputExceededException:
            time.sleep(THROTTLE_SLEEP_S)  # 5 GetRecords a second per shard
            return Batch([], False, self.behind_ms or 0)
        messages = list(self._messages(answer["Records"]))
        self._iterator = answer.get("NextShardIterator")
        self.behind_ms = int(answer.get("MillisBehindLatest", 0))
        if self._iterator is None:
            self.ended = True
        return Batch(messages, self.ended, self.behind_ms)

    def _messages(self, records: list[dict[str, Any]]) -> Iterator[Message]:
        shard = self.shard
        for item in iter_deaggregate_records(records, data_format="Boto3"):
            sub = item["kinesis"]
            position = pack(shard.index, int(sub["sequenceNumber"]),
                            int(sub.get("subSequenceNumber", 0)))
            if self.after is not None and position <= self.after:
                continue
            if sub.get("aggregated"):
                hash_key = sub.get("explicitHashKey")
                if hash_key is not None and not shard.holds(int(hash_key)):
                    self.dropped += 1
                    log_.warning("%s %s: dropped a sub-record whose explicit hash key %s is "
                                 "outside the shard's range (as the KCL does)", self.stream,
                                 shard.id, hash_key)
                    continue
                data = base64.b64decode(sub["data"])
            else:
                data = sub["data"]
            self.after = position
            try:
                envelope = decode(data)
            except EnvelopeError as exc:
                self.foreign += 1
                log_.warning("%s %s: skipped record %s: %s", self.stream, shard.id,
                             sub["sequenceNumber"], exc)
                continue
            stamp = sub.get("approximateArrivalTimestamp")
            millis = int(stamp.timestamp() * 1000) if stamp is not None else 0
            yield Message(self.topic, envelope.partition, position, envelope.value,
                          envelope.key, millis)


def read_shard(cursor: ShardCursor) -> Iterator[Message]:
    """Every message of the shard after the cursor's start, to the shard's end (closed) or
    to the tip as seen by the first answer that is empty and not behind (open)."""
    while True:
        batch = cursor.fetch()
        yield from batch.messages
        if batch.ended or (not batch.messages and batch.behind_ms == 0):
            return

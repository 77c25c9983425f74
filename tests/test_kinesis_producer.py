"""The Kinesis producer against kinesalite: KPL aggregation within Kinesis's limits, the
record size limit, and retries of failed entries that keep every virtual partition's order;
positions as ints (hypothesis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.aws_server import unique_name
from topics.backends import open_log
from topics.backends.kinesis.log import KinesisLog
from topics.backends.kinesis.positions import SEQUENCE_SPAN, SUB_SPAN, pack, shard_index, unpack
from topics.backends.kinesis.producer import (
    CALL_BYTES,
    CALL_RECORDS,
    MAX_MESSAGE_BYTES,
    RECORD_LIMIT,
)
from topics.spec import TopicSpec


@pytest.fixture
def log(kinesis_env: dict[str, str]) -> Iterator[KinesisLog]:
    opened = open_log("kinesis://", kinesis_prefix=unique_name("p") + ".",
                      kinesis_lease_table=unique_name("leases"), kinesis_shards=3)
    assert isinstance(opened, KinesisLog)
    try:
        yield opened
    finally:
        opened.close()


class Recording:
    """The real client, with every PutRecords call measured, and chosen entries failed
    (not sent, answered with an error code) as Kinesis fails entries of a call."""

    def __init__(self, real: Any, fail_every: int = 0):
        self.real = real
        self.fail_every = fail_every
        self.calls: list[tuple[int, int]] = []  # (records, bytes) per call
        self.failed = 0
        self._seen = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append((len(Records), sum(len(r["Data"]) + len(r["PartitionKey"])
                                             for r in Records)))
        fail = []
        for _ in Records:
            self._seen += 1
            fail.append(bool(self.fail_every) and self._seen % self.fail_every == 0)
        sent = [r for r, f in zip(Records, fail, strict=True) if not f]
        answered = iter(self.real.put_records(StreamName=StreamName, Records=sent)["Records"]
                        if sent else [])
        out = []
        for i, f in enumerate(fail):
            if f:
                self.failed += 1
                code = ("ProvisionedThroughputExceededException" if i % 2 == 0
                        else "InternalFailure")
                out.append({"ErrorCode": code, "ErrorMessage": "injected"})
            else:
                out.append(next(answered))
        return {"FailedRecordCount": sum(fail), "Records": out}


def test_aggregates_stay_within_the_limits_and_read_back_in_order(log: KinesisLog) -> None:
    log.ensure_topics([TopicSpec("t", 6, ("X",))])
    recording = Recording(log.kinesis)
    producer = log.producer()
    producer.client = recording
    expected: dict[int, list[bytes]] = {p: [] for p in range(6)}
    for i in range(6000):
        p = i % 6
        value = f"{p}-{i}".encode()
        if i % 1000 == 999:  # a few messages at the limit, each a record of its own
            value = value.ljust(MAX_MESSAGE_BYTES, b"x")
        producer.send("t", p, value, b"key")
        expected[p].append(value)
    with pytest.raises(ValueError, match="over the"):
        producer.send("t", 0, b"y" * (MAX_MESSAGE_BYTES + 600))
    producer.flush()
    assert all(records <= CALL_RECORDS and size <= CALL_BYTES
               for records, size in recording.calls)
    # aggregated: far fewer records than messages
    assert sum(records for records, _ in recording.calls) < 100
    for p in range(6):
        assert [m.value for m in log.read("t", p)] == expected[p]


def test_only_failed_entries_are_retried_and_order_is_kept(log: KinesisLog) -> None:
    log.ensure_topics([TopicSpec("t", 6, ("X",))])
    recording = Recording(log.kinesis, fail_every=3)
    producer = log.producer()
    producer.client = recording
    for round_ in range(40):  # many small flushes: many calls, a third of entries failed
        for p in range(6):
            producer.send("t", p, f"{p}-{round_}".encode())
        producer.flush()
    assert recording.failed >= 20 and producer.retried == recording.failed
    for p in range(6):
        got = list(log.read("t", p))
        assert [m.value for m in got] == [f"{p}-{r}".encode() for r in range(40)]


def test_max_message_bytes_leaves_room_for_the_envelope_and_the_aggregate() -> None:
    assert RECORD_LIMIT - 1024 == MAX_MESSAGE_BYTES


@given(st.integers(0, 10**6), st.integers(0, SEQUENCE_SPAN - 1), st.integers(0, SUB_SPAN - 1),
       st.integers(0, 10**6), st.integers(0, SEQUENCE_SPAN - 1), st.integers(0, SUB_SPAN - 1))
def test_positions_order_as_shard_then_sequence_then_sub(
        s1: int, q1: int, b1: int, s2: int, q2: int, b2: int) -> None:
    one, two = pack(s1, q1, b1), pack(s2, q2, b2)
    got = unpack(one)
    assert (got.shard, got.sequence, got.sub) == (s1, q1, b1)
    assert (one < two) == ((s1, q1, b1) < (s2, q2, b2))
    assert one >= 0


def test_shard_ids_are_parsed_and_refused() -> None:
    assert shard_index("shardId-000000000012") == 12
    with pytest.raises(ValueError, match="shard id"):
        shard_index("shard-12")
    with pytest.raises(ValueError, match="out of range"):
        pack(0, SEQUENCE_SPAN, 0)


def test_sub_records_outside_their_shard_are_dropped_as_the_kcl_does(log: KinesisLog) -> None:
    from aws_kinesis_agg.aggregator import RecordAggregator

    from topics.backends.kinesis.envelope import encode, hash_key_of
    from topics.backends.kinesis.records import ShardCursor, read_shard

    log.ensure_topics([TopicSpec("t", 6, ("X",))])
    shards = log.streams.shards("t")
    first = shards[0]
    inside = hash_key_of(0, 6)
    assert first.holds(inside) and not first.holds(hash_key_of(5, 6))
    # An aggregate put to the first shard that also carries a sub-record of another shard's
    # range (what a producer aggregating across shards would do).
    agg = RecordAggregator()
    agg.add_user_record("0", encode(0, None, b"mine"), str(inside))
    agg.add_user_record("5", encode(5, None, b"stray"), str(hash_key_of(5, 6)))
    agg.add_user_record("0", encode(0, None, b"mine too"), str(inside))
    pk, ehk, data = agg.clear_and_get().get_contents()
    log.kinesis.put_record(StreamName=log.streams.name("t"), Data=data, PartitionKey=pk,
                           ExplicitHashKey=ehk)
    # and a plain record (not aggregated) is read as it is
    log.kinesis.put_record(StreamName=log.streams.name("t"), Data=encode(1, b"k", b"plain"),
                           PartitionKey="1", ExplicitHashKey=str(hash_key_of(1, 6)))
    cursor = ShardCursor(log.kinesis, log.streams.name("t"), "t", first)
    got = list(read_shard(cursor))
    assert [(m.partition, m.value) for m in got] == [(0, b"mine"), (0, b"mine too"),
                                                     (1, b"plain")]
    assert cursor.dropped == 1
    assert [unpack(m.position).sub for m in got] == [0, 2, 0]


def test_user_mistakes_get_one_line_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        open_log("kinesis://?bogus=1")
    with pytest.raises(ValueError, match="failover_ms 5: expected 100 or more"):
        open_log("kinesis://", kinesis_failover_ms=5)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    with pytest.raises(ValueError, match="no AWS region; set AWS_REGION"):
        open_log("kinesis://")


def test_a_resume_point_no_longer_in_the_shard_reads_from_the_oldest_record_left(
        log: KinesisLog, caplog: pytest.LogCaptureFixture) -> None:
    from topics.backends.kinesis.records import ShardCursor, read_shard

    log.ensure_topics([TopicSpec("t", 3, ("X",))])
    producer = log.producer()
    for p in range(3):
        producer.send("t", p, f"m{p}".encode())
    producer.flush()
    first, second = log.streams.shards("t")[:2]
    foreign = next(iter(log.read("t", 1)))  # a record of another shard
    assert unpack(foreign.position).shard == second.index
    # A position in the first shard whose record it does not hold (as after retention)
    gone = pack(first.index, unpack(foreign.position).sequence, 0)
    cursor = ShardCursor(log.kinesis, log.streams.name("t"), "t", first, gone)
    got = [m for m in read_shard(cursor)]
    assert "no longer in the stream" in caplog.text  # kinesalite refused AT_SEQUENCE_NUMBER
    # read from the oldest record left, dropping what lies at or below the resume point
    everything = list(read_shard(ShardCursor(log.kinesis, log.streams.name("t"), "t", first)))
    assert [m.value for m in everything] == [b"m0"]
    assert got == [m for m in everything if m.position > gone]

"""The Log contract on the Kafka backend, against a real broker (Tansu, see kafka_broker.py):
topics, produce and read, the high-watermark end of reads, commits, consumer groups with
rebalance callbacks (in threads and in a SIGKILLed child process), group admin, and a
whole pipeline run on Kafka.

The child process runs this file as a script (see `_main` at the bottom).
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from tests.kafka_broker import GROUP_TIMEOUTS, fresh_kafka_bootstrap, kafka_bootstrap, unique
from topics.backends import open_log
from topics.backends.kafka.log import KafkaLog
from topics.backends.kafka.options import split_options
from topics.log import GroupBusyError, Message, TopicError, TopicPartition
from topics.spec import TopicSpec

__all__ = ["fresh_kafka_bootstrap", "kafka_bootstrap"]  # fixtures, used by name

THIS = Path(__file__).resolve()
WAIT_S = 20.0  # upper bound of every wait on a condition


# -- helpers ------------------------------------------------------------------------------

def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S,
               step: Callable[[], object] | None = None) -> float:
    """Runs `step` (or sleeps briefly) until `cond` holds; returns the seconds it took."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def log(kafka_bootstrap: str) -> Iterator[KafkaLog]:
    opened = open_log(f"kafka://{kafka_bootstrap}", **GROUP_TIMEOUTS)
    assert isinstance(opened, KafkaLog)
    try:
        yield opened
    finally:
        opened.close()


def new_topic(log: KafkaLog, partitions: int = 4, changelog: bool = False) -> str:
    name = unique("t")
    log.ensure_topics([TopicSpec(name, partitions, ("X",), changelog=changelog)])
    return name


def produce(log: KafkaLog, topic: str, counts: dict[int, int], tag: str = "v") -> None:
    producer = log.producer()
    for partition, n in counts.items():
        for i in range(n):
            producer.send(topic, partition, f"{tag}{partition}-{i}".encode(), f"k{i}".encode())
    producer.flush()


def values(messages: Sequence[Message]) -> list[bytes]:
    return [m.value for m in messages]


class Recorder:
    """A rebalance listener that records what it was told, with the thread it ran on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[TopicPartition]]] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()
        self.on_revoked_hook: Callable[[list[TopicPartition]], None] | None = None

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            self.events.append(("assigned", list(tps)))
            self.threads.add(threading.current_thread().name)

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        if self.on_revoked_hook is not None:
            self.on_revoked_hook(list(tps))
        with self.lock:
            self.events.append(("revoked", list(tps)))

    def kinds(self) -> list[str]:
        with self.lock:
            return [kind for kind, _ in self.events]


class Member:
    """A consumer polled in a thread of its own, as a worker process would."""

    def __init__(self, log: KafkaLog, group: str, topic: str, name: str):
        self.recorder = Recorder()
        self.consumer = log.consumer(group, [topic], self.recorder, member=name)
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"member-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.messages.extend(self.consumer.poll(100, 0.05))
        except BaseException as exc:
            self._error = exc

    def owned(self) -> set[int]:
        self.check()
        return {tp.partition for tp in self.consumer.assignment()}

    def check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"member thread failed: {self._error!r}") from self._error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT_S)
        assert not self._thread.is_alive()
        self.consumer.close()
        self.check()


# -- options ------------------------------------------------------------------------------

def test_kafka_options_are_typed_split_per_client_and_checked() -> None:
    split = split_options({"linger.ms": "20", "fetch_max_wait_ms": "100",
                           "request.timeout.ms": "5000", "check_crcs": "false",
                           "client_id": "svc", "retry_backoff_ms": "1.5"})
    assert split["producer"]["linger_ms"] == 20
    assert "linger_ms" not in split["consumer"]
    assert split["consumer"]["fetch_max_wait_ms"] == 100
    assert split["consumer"]["check_crcs"] is False
    for client in ("producer", "consumer", "admin"):
        assert split[client]["request_timeout_ms"] == 5000
        assert split[client]["client_id"] == "svc"
        assert split[client]["retry_backoff_ms"] == 1.5
    with pytest.raises(ValueError, match="unknown kafka option 'lingr_ms'"):
        split_options({"lingr_ms": "5"})
    with pytest.raises(ValueError, match=r"group\.id"):
        split_options({"group.id": "other"})


def test_open_log_takes_a_server_list_and_ignores_other_backends_options(
        kafka_bootstrap: str) -> None:
    opened = open_log(f"kafka://{kafka_bootstrap},{kafka_bootstrap}/", fsync=True,
                      kafka_options={"request.timeout.ms": "20000"})
    try:
        assert isinstance(opened, KafkaLog)
        topic = new_topic(opened, partitions=2)
        assert opened.partitions(topic) == [0, 1]
    finally:
        opened.close()
    with pytest.raises(ValueError, match="bootstrap"):
        open_log("kafka://")


# -- topics -------------------------------------------------------------------------------

def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)],
                                           config_filter="all")
    finally:
        admin.close()
    return {k: v["value"] for k, v in described["topic"][topic].items()}


def test_ensure_topics_creates_topics_with_their_specs_config_and_refuses_other_counts(
        log: KafkaLog, kafka_bootstrap: str) -> None:
    plain, changelog, table = unique("plain"), unique("changelog"), unique("table")
    specs = [TopicSpec(plain, 3, ("X",)),
             TopicSpec(changelog, 2, ("X",), changelog=True, retention_ms=7 * 86_400_000),
             TopicSpec(table, 1, ("X",), cleanup="compact", retention_bytes=1 << 30)]
    log.ensure_topics(specs)
    log.ensure_topics(specs)  # idempotent
    assert log.partitions(plain) == [0, 1, 2]
    assert log.partitions(changelog) == [0, 1]
    with pytest.raises(TopicError) as err:
        log.ensure_topics([TopicSpec(plain, 4, ("X",))])
    assert plain in str(err.value) and "3 partitions" in str(err.value)
    assert "4" in str(err.value)
    with pytest.raises(TopicError, match="no topic"):
        log.partitions(unique("missing"))
    # "keep forever" is explicit (-1): the broker's default would expire after 7 days
    wanted = {plain: ("delete", "-1", "-1"), changelog: ("delete", "604800000", "-1"),
              table: ("compact", "-1", str(1 << 30))}
    for topic, (policy, ms, size) in wanted.items():
        config = topic_config(kafka_bootstrap, topic)
        assert (config["cleanup.policy"], config["retention.ms"],
                config["retention.bytes"]) == (policy, ms, size), topic


def test_keyless_record_to_a_compacted_topic_is_refused_at_send(
        log: KafkaLog, kafka_bootstrap: str) -> None:
    """Tansu accepts keyless records on compacted topics; Apache Kafka refuses them. The
    producer enforces the broker's rule, with the policy the brokers report, so a topic
    compacted outside topics.toml (here created by another admin client) counts too."""
    compacted, plain, outside = unique("compacted"), unique("plain"), unique("outside")
    log.ensure_topics([TopicSpec(compacted, 1, ("X",), cleanup="compact"),
                       TopicSpec(plain, 1, ("X",))])
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(outside, 1, 1,
                                      topic_configs={"cleanup.policy": "compact,delete"})])
    finally:
        admin.close()
    producer = log.producer()
    for topic in (compacted, outside):
        with pytest.raises(ValueError,
                           match="Compacted topic cannot accept message without key") as err:
            producer.send(topic, 0, b"no key")
        assert f"{topic}[0]" in str(err.value)
        producer.send(topic, 0, b"keyed", b"k")
    producer.send(plain, 0, b"no key")
    producer.flush()
    assert [(m.key, m.value) for m in log.read(compacted, 0)] == [(b"k", b"keyed")]
    assert [(m.key, m.value) for m in log.read(plain, 0)] == [(None, b"no key")]


# -- produce and read ---------------------------------------------------------------------

def test_round_trip_keeps_keys_values_order_and_dense_positions(log: KafkaLog) -> None:
    topic = new_topic(log)
    before = int(time.time() * 1000)
    producer = log.producer()
    sent: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in range(4)}
    for i in range(400):
        p = i % 4
        key = None if i % 7 == 0 else f"user-{i}".encode()
        value = f"value-{i}".encode() * (1 + i % 5)
        producer.send(topic, p, value, key)
        sent[p].append((value, key))
    producer.flush()
    for p in range(4):
        got = list(log.read(topic, p))
        assert [(m.value, m.key) for m in got] == sent[p]
        assert [m.position for m in got] == list(range(len(sent[p])))
        assert all(m.topic == topic and m.partition == p for m in got)
        assert all(m.timestamp_ms >= before - 5000 for m in got)
    tail = list(log.read(topic, 1, after=89))
    assert [m.position for m in tail] == list(range(90, 100))
    assert list(log.read(topic, 1, after=99)) == []


def test_read_ends_at_the_high_watermark_seen_when_it_started(log: KafkaLog) -> None:
    topic = new_topic(log, partitions=1)
    produce(log, topic, {0: 50}, tag="first")  # one flush: multi-record batches
    reader = log.read(topic, 0)
    first = next(reader)
    produce(log, topic, {0: 20}, tag="later")
    rest = list(reader)
    assert [first, *rest] == list(log.read(topic, 0))[:50]
    assert len(rest) == 49
    assert values(list(log.read(topic, 0)))[50:] == [f"later0-{i}".encode() for i in range(20)]


def test_reads_see_data_written_between_them_at_the_same_offsets(log: KafkaLog) -> None:
    """A read that starts where the previous read of the partition ended must not take the
    end from a fetch that was still in flight from that previous read."""
    topic = new_topic(log, partitions=1)
    for round_ in range(5):
        assert list(log.read(topic, 0, after=round_ * 3 - 1 if round_ else None)) == []
        produce(log, topic, {0: 3}, tag=f"r{round_}-")
        got = list(log.read(topic, 0, after=round_ * 3 - 1 if round_ else None))
        assert [m.position for m in got] == [round_ * 3, round_ * 3 + 1, round_ * 3 + 2]
    assert len(list(log.read(topic, 0))) == 15


def test_empty_partitions_read_promptly(log: KafkaLog) -> None:
    topic = new_topic(log, partitions=4)
    started = time.monotonic()
    for _ in range(10):
        for p in range(4):
            assert list(log.read(topic, p)) == []
    took = time.monotonic() - started
    assert took < 4.0, f"40 reads of empty partitions took {took:.2f}s"
    produce(log, topic, {2: 1})
    assert values(list(log.read(topic, 2))) == [b"v2-0"]
    assert list(log.read(topic, 3)) == []


def test_nested_reads_and_abandoned_reads(log: KafkaLog) -> None:
    topic = new_topic(log, partitions=2)
    produce(log, topic, {0: 30, 1: 10})
    pairs = [(a.position, b.position) for a in log.read(topic, 0)
             for b in log.read(topic, 1) if b.position == a.position]
    assert pairs == [(i, i) for i in range(10)]
    for _ in range(3):
        first = next(iter(log.read(topic, 0, after=4)))  # abandoned after one message
        assert first.position == 5
    assert len(list(log.read(topic, 0, after=4))) == 25


def test_read_at_returns_the_message_at_a_position(log: KafkaLog) -> None:
    topic = new_topic(log, partitions=2)
    produce(log, topic, {1: 12})
    msg = log.read_at(topic, 1, 7)
    assert (msg.position, msg.value, msg.key) == (7, b"v1-7", b"k7")
    assert log.read_at(topic, 1, 0).value == b"v1-0"
    with pytest.raises(TopicError, match="no message at position 12"):
        log.read_at(topic, 1, 12)
    with pytest.raises(TopicError):
        log.read_at(topic, 0, 0)
    with pytest.raises(TopicError):
        list(log.read(unique("missing"), 0))


def test_oversize_message_is_refused_with_a_clear_error(kafka_bootstrap: str) -> None:
    small = open_log(f"kafka://{kafka_bootstrap}", max_request_size=10_000)
    try:
        topic = new_topic(small, partitions=2)  # type: ignore[arg-type]
        producer = small.producer()
        producer.send(topic, 1, b"x" * 9_000, b"key")
        with pytest.raises(ValueError) as err:
            producer.send(topic, 1, b"x" * 10_001)
        text = str(err.value)
        assert f"{topic}[1]" in text and "10,001" in text and "10,000" in text
        producer.flush()
        assert [len(m.value) for m in small.read(topic, 1)] == [9_000]
    finally:
        small.close()


def test_large_packed_messages_round_trip(log: KafkaLog) -> None:
    topic = new_topic(log, partitions=1)
    producer = log.producer()
    blobs = [bytes([i]) * 150_000 for i in range(30)]
    for blob in blobs:
        producer.send(topic, 0, blob)
    producer.flush()
    assert values(list(log.read(topic, 0))) == blobs
    assert log.describe(topic)[0].messages == 30


# -- consumer groups ----------------------------------------------------------------------

def test_commit_committed_and_seek_after(log: KafkaLog) -> None:
    topic, group = new_topic(log, partitions=2), unique("g")
    produce(log, topic, {0: 10, 1: 10})
    recorder = Recorder()
    consumer = log.consumer(group, [topic], recorder, member="solo")
    try:
        got: list[Message] = []
        wait_until(lambda: len(got) >= 20, "all 20 messages",
                   step=lambda: got.extend(consumer.poll(50, 0.0)))
        assert recorder.events[0] == ("assigned", [TopicPartition(topic, 0),
                                                   TopicPartition(topic, 1)])
        assert recorder.threads and threading.current_thread().name not in recorder.threads
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        assert consumer.committed(tp0) is None
        assert consumer.committed_metadata(tp0) == ""
        consumer.commit({tp0: 4, tp1: 9})
        assert consumer.committed(tp0) == 4  # the last processed position, not Kafka's 5
        assert consumer.committed(tp1) == 9
        positions = {gp.tp: gp for gp in log.group_positions(group)}
        assert (positions[tp0].committed, positions[tp0].lag) == (4, 5)
        assert (positions[tp1].committed, positions[tp1].lag) == (9, 0)
        assert group in log.groups()

        consumer.seek_after(tp0, 6)
        again: list[Message] = []
        wait_until(lambda: len(again) >= 3, "messages after the seek",
                   step=lambda: again.extend(consumer.poll(50, 0.0)))
        assert [(m.partition, m.position) for m in again] == [(0, 7), (0, 8), (0, 9)]
        consumer.seek_after(tp1, None)
        again.clear()
        wait_until(lambda: len(again) >= 10, "partition 1 from its start",
                   step=lambda: again.extend(consumer.poll(50, 0.0)))
        assert [m.position for m in again] == list(range(10))
    finally:
        consumer.close()
    assert recorder.kinds() == ["assigned", "revoked"]


@pytest.mark.xfail(strict=True, reason="Tansu 0.6 stores no commit metadata (OffsetFetch "
                   "answers null for any OffsetCommit version); Kafka keeps it")
def test_commit_metadata_round_trips(log: KafkaLog) -> None:
    topic, group = new_topic(log, partitions=1), unique("g")
    produce(log, topic, {0: 3})
    consumer = log.consumer(group, [topic], Recorder(), member="meta")
    tp = TopicPartition(topic, 0)
    try:
        wait_until(lambda: bool(consumer.assignment()), "an assignment",
                   step=lambda: consumer.poll(10, 0.0))
        consumer.commit({tp: 2}, {tp: "stamp=12,3"})
        assert consumer.committed(tp) == 2
        assert consumer.committed_metadata(tp) == "stamp=12,3"
    finally:
        consumer.close()


def test_revocation_checkpoints_commit_and_listener_errors_surface(log: KafkaLog) -> None:
    topic, group = new_topic(log, partitions=1), unique("g")
    produce(log, topic, {0: 5})
    recorder = Recorder()
    consumer = log.consumer(group, [topic], recorder, member="m")
    seen: list[Message] = []
    recorder.on_revoked_hook = lambda tps: consumer.commit({seen[-1].tp: seen[-1].position})
    wait_until(lambda: len(seen) >= 5, "5 messages",
               step=lambda: seen.extend(consumer.poll(50, 0.0)))
    consumer.close()  # on_revoked commits, from inside the revocation
    assert recorder.kinds() == ["assigned", "revoked"]
    assert [gp.committed for gp in log.group_positions(group)] == [4]

    class Broken(Recorder):
        def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
            raise RuntimeError("restore failed: corrupt changelog")

    broken = log.consumer(unique("g"), [topic], Broken(), member="b")
    try:
        with pytest.raises(RuntimeError, match="corrupt changelog"):
            wait_until(lambda: False, "an error", step=lambda: broken.poll(10, 0.0))
    finally:
        broken.close()


def test_two_members_share_partitions_and_hand_over_on_close(log: KafkaLog) -> None:
    topic, group = new_topic(log, partitions=4), unique("g")
    produce(log, topic, {p: 25 for p in range(4)})
    a = Member(log, group, topic, "a")
    b: Member | None = None
    try:
        wait_until(lambda: a.owned() == {0, 1, 2, 3}, "a to own every partition")
        b = Member(log, group, topic, "b")
        # A member's assignment shows before its on_assigned callback has finished (that
        # runs while its poll waits, after seeking to the committed positions), so the split
        # counts once both callbacks have run.
        took = wait_until(lambda: len(a.owned()) == 2 and len(b.owned()) == 2
                          and a.owned() | b.owned() == {0, 1, 2, 3}
                          and a.recorder.kinds()[:3] == ["assigned", "revoked", "assigned"]
                          and "assigned" in b.recorder.kinds(), "a 2/2 split")
        assert took < 15
        assert sorted(log.active_members(group)) == ["a", "b"]
        b_had = b.owned()
        b.close()
        assert b.recorder.events[-1] == ("revoked", [TopicPartition(topic, p)
                                                     for p in sorted(b_had)])
        b = None
        took = wait_until(lambda: a.owned() == {0, 1, 2, 3}, "a to take b's partitions")
        print(f"a took b's partitions {took:.1f}s after b closed")
        assert took < 10
        assert log.active_members(group) == ["a"]
        # Nothing was committed: each partition went to a from its start, every time.
        seen = {(m.partition, m.position) for m in a.messages}
        assert seen == {(p, i) for p in range(4) for i in range(25)}
    finally:
        if b is not None:
            b.close()
        a.close()
    assert log.active_members(group) == []


def test_a_sigkilled_member_loses_its_partitions_to_the_survivor(
        log: KafkaLog, kafka_bootstrap: str) -> None:
    topic, group = new_topic(log, partitions=4), unique("g")
    survivor = Member(log, group, topic, "survivor")
    child = subprocess.Popen(
        [sys.executable, str(THIS), "member", kafka_bootstrap, group, topic, "doomed"],
        stdout=subprocess.PIPE, text=True, cwd=THIS.parent.parent,
        env={**os.environ, "PYTHONPATH": str(THIS.parent.parent)})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout or ()],
                     daemon=True).start()
    try:
        child_owns: set[int] = set()

        def child_reported() -> bool:
            while not lines.empty():
                kind, _, parts = lines.get().strip().partition(" ")
                if kind == "assigned":
                    child_owns.clear()
                    child_owns.update(int(p) for p in parts.split(",") if p)
            return bool(child_owns) and len(survivor.owned()) == 2 and \
                survivor.owned() | child_owns == {0, 1, 2, 3}

        wait_until(child_reported, "the child and the survivor to split the partitions")
        assert sorted(log.active_members(group)) == ["doomed", "survivor"]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=WAIT_S)
        took = wait_until(lambda: survivor.owned() == {0, 1, 2, 3},
                          "the survivor to take the killed member's partitions")
        print(f"survivor took the killed member's partitions in {took:.1f}s")
        assert took < 12, f"took {took:.1f}s"
        wait_until(lambda: log.active_members(group) == ["survivor"],
                   "the killed member to leave the group's description", timeout=5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=WAIT_S)
        survivor.close()


def test_reset_group_is_refused_while_members_run_and_applied_after(log: KafkaLog) -> None:
    topic, group = new_topic(log, partitions=2), unique("g")
    produce(log, topic, {0: 10, 1: 10})
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = log.consumer(group, [topic], Recorder(), member="busy")
    try:
        got: list[Message] = []
        wait_until(lambda: len(got) == 20, "the member to read everything",
                   step=lambda: got.extend(consumer.poll(50, 0.0)))
        consumer.commit({tp0: 9, tp1: 9}, {tp0: "stamp=1,1", tp1: "stamp=2,2"})
        with pytest.raises(GroupBusyError, match="busy"):
            log.reset_group(group, {tp0: 2})
    finally:
        consumer.close()
    assert log.active_members(group) == []
    log.reset_group(group, {tp0: 2, tp1: None})
    positions = {gp.tp: (gp.committed, gp.lag) for gp in log.group_positions(group)}
    assert positions == {tp0: (2, 7), tp1: (None, 10)}
    again = log.consumer(group, [topic], Recorder(), member="again")
    try:
        got = []
        wait_until(lambda: len(got) == 17, "re-reading from the reset positions",
                   step=lambda: got.extend(again.poll(50, 0.0)))
        assert sorted((m.partition, m.position) for m in got) == \
            [(0, p) for p in range(3, 10)] + [(1, p) for p in range(10)]
        assert again.committed(tp1) is None
        assert again.committed_metadata(tp0) == again.committed_metadata(tp1) == ""
    finally:
        again.close()


def test_describe_and_group_lag_use_high_watermarks(log: KafkaLog) -> None:
    topic, group = new_topic(log, partitions=3), unique("g")
    produce(log, topic, {0: 40, 2: 7})  # one flush: multi-record batches
    produce(log, topic, {0: 5})
    info = {pi.partition: pi for pi in log.describe(topic)}
    assert (info[0].first_position, info[0].last_position, info[0].messages) == (0, 44, 45)
    assert (info[1].first_position, info[1].last_position, info[1].messages) == (None, None, 0)
    assert (info[2].first_position, info[2].last_position, info[2].messages) == (0, 6, 7)
    assert log.groups().count(group) == 0
    log.reset_group(group, {TopicPartition(topic, 0): 29})
    lag = {gp.tp.partition: (gp.committed, gp.lag, gp.owner) for gp in log.group_positions(group)}
    assert lag == {0: (29, 15, None), 1: (None, 0, None), 2: (None, 7, None)}
    assert group in log.groups()


# -- the whole pipeline on Kafka ----------------------------------------------------------

def test_pipeline_imports_processes_and_delivers_on_kafka(
        fresh_kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streams.pipeline
    from processors.pipeline_state import CLOSED
    from streams.pipeline import Pipeline
    from streams.settings import Settings
    from tests.support import expected_members, random_rows, write_csv

    # Settings do not carry group timeouts yet: give the pipeline's log the short ones.
    monkeypatch.setattr(streams.pipeline, "open_log",
                        functools.partial(open_log, **GROUP_TIMEOUTS))
    settings = Settings(data_dir=tmp_path / "data", backend="kafka",
                        bootstrap=fresh_kafka_bootstrap, message_rows=100,
                        checkpoint_interval_s=0.2)
    rows = random_rows(2_000, users=300, segments=4, seed=7)
    path = write_csv(tmp_path / "batch.csv", rows)
    pipe = Pipeline(settings)
    try:
        assert pipe.log.url == f"kafka://{fresh_kafka_bootstrap}"
        result = pipe.importer().run(pipe.import_request(str(path)))
        assert result.outcome == "published" and result.rows == 2_000
        worker = pipe.worker(member="w1")

        def closed() -> bool:
            status = pipe.batches().get(result.batch_id)
            return status is not None and status.status == CLOSED

        assert worker.run(until=closed, timeout_s=90), "the batch did not close in time"
        pipe.wait_for_groups(["processor-segments", "sink-warehouse"], timeout_s=30)
        assert set(pipe.warehouse.members()) == expected_members([("add", rows)])
        status = pipe.batches()[result.batch_id]
        assert status.rows == 2_000 and status.rejected == 0
    finally:
        pipe.close()


# -- child process ------------------------------------------------------------------------

def _main(argv: list[str]) -> None:
    """`member BOOTSTRAP GROUP TOPIC NAME`: a group member that reports its assignments
    on stdout and polls until it is killed (or 120 s pass)."""
    _cmd, bootstrap, group, topic, name = argv

    class Report:
        def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
            print("assigned", ",".join(str(tp.partition) for tp in tps), flush=True)

        def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
            print("revoked", ",".join(str(tp.partition) for tp in tps), flush=True)

    child_log = open_log(f"kafka://{bootstrap}", **GROUP_TIMEOUTS)
    consumer = child_log.consumer(group, [topic], Report(), member=name)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        consumer.poll(100, 0.1)


if __name__ == "__main__":
    _main(sys.argv[1:])

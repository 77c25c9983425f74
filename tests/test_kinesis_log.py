"""The Log contract on the Kinesis backend, against kinesalite (streams, shards, resharding)
and the moto server (the DynamoDB lease table): topics, producing with KPL aggregation,
reads, positions, leases (take, renew, expire, release, balance), commits and resharding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from streams.shard_view import echo_shards
from tests.aws_server import unique_name
from topics.backends import open_log
from topics.backends.kinesis.log import KinesisLog
from topics.backends.kinesis.positions import unpack
from topics.log import GroupBusyError, Message, TopicError, TopicPartition
from topics.spec import TopicSpec

WAIT_S = 30.0
FAILOVER_MS = 3000  # short for tests, long enough for a loaded 2-core machine


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S,
               step: Callable[[], object] | None = None) -> float:
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
def log(kinesis_env: dict[str, str]) -> Iterator[KinesisLog]:
    opened = open_log("kinesis://", kinesis_prefix=unique_name("t") + ".",
                      kinesis_lease_table=unique_name("leases"),
                      kinesis_failover_ms=FAILOVER_MS)
    assert isinstance(opened, KinesisLog)
    try:
        yield opened
    finally:
        opened.close()


def new_topic(log: KinesisLog, partitions: int = 4, shards: int = 2) -> str:
    name = "topic"
    log.streams.options = type(log.options)(**{**_fields(log.options), "shards": shards})
    log.ensure_topics([TopicSpec(name, partitions, ("X",))])
    return name


def _fields(options: object) -> dict[str, object]:
    return {f: getattr(options, f) for f in options.__slots__}  # type: ignore[attr-defined]


def produce(log: KinesisLog, topic: str, counts: dict[int, int], tag: str = "v") -> None:
    producer = log.producer()
    for i in range(max(counts.values())):
        for partition, n in counts.items():
            if i < n:
                producer.send(topic, partition, f"{tag}{partition}-{i}".encode(), b"k%d" % i)
    producer.flush()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, list[TopicPartition]]] = []
        self.lock = threading.Lock()
        self.on_revoked_hook: Callable[[list[TopicPartition]], None] | None = None

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            self.events.append(("assigned", list(tps)))

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        if self.on_revoked_hook is not None:
            self.on_revoked_hook(list(tps))
        with self.lock:
            self.events.append(("revoked", list(tps)))

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        with self.lock:
            self.events.append(("lost", list(tps)))

    def kinds(self) -> list[str]:
        with self.lock:
            return [kind for kind, _ in self.events]


def by_partition(messages: Sequence[Message]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for m in messages:
        out.setdefault(m.partition, []).append(m.value)
    return out


def expected(counts: dict[int, int], tag: str = "v") -> dict[int, list[bytes]]:
    return {p: [f"{tag}{p}-{i}".encode() for i in range(n)] for p, n in counts.items() if n}


# -- topics and reads ---------------------------------------------------------------------

def test_topics_record_their_virtual_partitions_and_refuse_another_count(
        log: KinesisLog) -> None:
    topic = new_topic(log, partitions=6, shards=2)
    assert log.partitions(topic) == list(range(6))
    log.ensure_topics([TopicSpec(topic, 6, ("X",))])  # again: fine
    with pytest.raises(TopicError, match="6 virtual partitions"):
        log.ensure_topics([TopicSpec(topic, 4, ("X",))])


def test_produce_and_read_each_virtual_partition_in_order(log: KinesisLog) -> None:
    topic = new_topic(log, partitions=4, shards=2)
    counts = {0: 50, 1: 0, 2: 7, 3: 120}
    produce(log, topic, counts)
    for p, n in counts.items():
        got = list(log.read(topic, p))
        assert [m.value for m in got] == expected(counts).get(p, [])
        assert [m.key for m in got] == [b"k%d" % i for i in range(n)]
        positions = [m.position for m in got]
        assert positions == sorted(positions) and len(set(positions)) == n
        if got:
            middle = got[len(got) // 2]
            assert [m.value for m in log.read(topic, p, middle.position)] == \
                [m.value for m in got[len(got) // 2 + 1:]]
            assert log.read_at(topic, p, middle.position).value == middle.value
    assert [i.messages for i in log.describe(topic)] == [50, 0, 7, 120]
    assert not log.truncated(topic, 0)


class Member:
    """A consumer polled in a thread of its own, as a worker process would; commits what
    it polled after every poll."""

    def __init__(self, log: KinesisLog, group: str, topic: str, name: str,
                 commit: bool = True):
        self.recorder = Recorder()
        self.consumer = log.consumer(group, [topic], self.recorder, member=name)
        self.messages: list[Message] = []
        self.commit = commit
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"member-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                got = self.consumer.poll(100, 0.05)
                with self.lock:
                    self.messages.extend(got)
                if got and self.commit:
                    last: dict[TopicPartition, int] = {}
                    for m in got:
                        last[m.tp] = m.position
                    self.consumer.commit(last)
        except BaseException as exc:
            self._error = exc

    def owned(self) -> set[int]:
        self.check()
        return {tp.partition for tp in self.consumer.assignment()}

    def seen(self) -> list[Message]:
        with self.lock:
            return list(self.messages)

    def check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"member thread failed: {self._error!r}") from self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT_S)
        assert not self._thread.is_alive()
        self.check()

    def close(self) -> None:
        self.stop()
        self.consumer.close()


def test_a_consumer_reads_everything_commits_and_a_new_one_resumes_after(
        log: KinesisLog) -> None:
    topic = new_topic(log, partitions=4, shards=2)
    counts = {0: 30, 1: 5, 2: 0, 3: 64}
    produce(log, topic, counts)
    member = Member(log, "g", topic, "a")
    try:
        wait_until(lambda: len(member.seen()) == sum(counts.values()), "all messages")
        assert by_partition(member.seen()) == expected(counts)
        assert member.owned() == {0, 1, 2, 3}
        assert member.recorder.events[0][0] == "assigned"
    finally:
        member.close()
    assert member.recorder.kinds()[-1] == "revoked"
    # Committed and readable by a fresh consumer; a new one reads only what came after.
    produce(log, topic, {0: 3, 3: 2}, tag="w")
    second = Member(log, "g", topic, "b")
    try:
        wait_until(lambda: len(second.seen()) == 5, "the new messages")
        assert by_partition(second.seen()) == expected({0: 3, 3: 2}, tag="w")
        tp = TopicPartition(topic, 3)
        wait_until(lambda: second.consumer.committed(tp) == second.seen()[-1].position
                   or second.consumer.committed(tp) is not None, "commit")
    finally:
        second.close()
    positions = {gp.tp.partition: gp for gp in log.group_positions("g")}
    assert positions[2].committed is None and all(gp.lag == 0 for gp in positions.values())
    assert positions[3].committed == [m for m in second.seen() if m.partition == 3][-1].position


def test_topics_shows_each_leases_lag_in_milliseconds(
        log: KinesisLog, capsys: pytest.CaptureFixture[str]) -> None:
    topic = new_topic(log, partitions=4, shards=2)
    counts = {0: 20, 1: 3, 2: 7, 3: 11}
    produce(log, topic, counts)
    member = Member(log, "g", topic, "a")
    try:
        wait_until(lambda: len(member.seen()) == sum(counts.values()), "all messages")
        wait_until(lambda: all(gp.lag == 0 for gp in log.group_positions("g")), "commits")
    finally:
        member.close()
    # Read from GetRecords after each checkpoint: caught up, so 0 ms behind (kinesalite
    # reports 0 for an open shard however far behind; real Kinesis the distance in time).
    view = log.shard_view(topic, "g")
    assert [row["millis_behind"] for row in view] == [0, 0]
    assert all(row["checkpoint"] not in (None, "TRIM_HORIZON") for row in view)
    assert [row["millis_behind"] for row in log.shard_view(topic)] == [None, None]  # no group
    echo_shards(log, [topic])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("GROUP"))
    assert lines[header].split()[-3:] == ["LAG", "MS", "CHECKPOINT"]
    leases = [line.split() for line in lines[header + 1:] if line.strip()]
    assert [(row[0], row[2], row[-2]) for row in leases] == [
        ("g", row["shard"], "0") for row in view]
    assert [row[-1] for row in leases] == [row["checkpoint"] for row in view]


def test_commit_metadata_round_trips_and_reset_group_clears_it(log: KinesisLog) -> None:
    topic = new_topic(log, partitions=2, shards=1)
    produce(log, topic, {0: 4, 1: 4})
    rec = Recorder()
    consumer = log.consumer("g", [topic], rec, member="solo")
    try:
        got: list[Message] = []
        wait_until(lambda: len(got) == 8, "messages",
                   step=lambda: got.extend(consumer.poll(100, 0.05)))
        tp = TopicPartition(topic, 1)
        last = [m for m in got if m.partition == 1][-1]
        consumer.commit({tp: last.position}, {tp: "stamp-7"})
        assert consumer.committed(tp) == last.position
        assert consumer.committed_metadata(tp) == "stamp-7"
        with pytest.raises(GroupBusyError):
            log.reset_group("g", {tp: None})
    finally:
        consumer.close()
    assert log.active_members("g") == []
    first = next(m for m in got if m.partition == 1)
    log.reset_group("g", {tp: first.position})
    again = log.consumer("g", [topic], Recorder(), member="again")
    try:
        assert again.committed(tp) == first.position
        assert again.committed_metadata(tp) == ""
        seen: list[Message] = []
        wait_until(lambda: len([m for m in seen if m.partition == 1]) == 3, "re-read",
                   step=lambda: seen.extend(again.poll(100, 0.05)))
    finally:
        again.close()


def test_two_consumers_split_the_shards_and_a_graceful_close_hands_over_fast(
        log: KinesisLog) -> None:
    topic = new_topic(log, partitions=8, shards=4)
    a = Member(log, "g", topic, "a")
    b = None
    try:
        wait_until(lambda: len(a.owned()) == 8, "a owns everything")
        b = Member(log, "g", topic, "b")
        wait_until(lambda: len(a.owned()) == 4 and len(b.owned()) == 4, "balance")
        assert a.owned().isdisjoint(b.owned())
        produce(log, topic, dict.fromkeys(range(8), 20))
        wait_until(lambda: len(a.seen()) + len(b.seen()) == 160, "all messages")
        assert by_partition(a.seen() + b.seen()) == expected(dict.fromkeys(range(8), 20))
        b.close()
        took = wait_until(lambda: len(a.owned()) == 8, "a takes b's shards back")
        assert took < 3 * FAILOVER_MS / 1000, took  # released: no wait for expiry
        produce(log, topic, dict.fromkeys(range(8), 1), tag="w")
        wait_until(lambda: len(a.seen()) + len(b.seen()) == 168, "the new messages")
        assert sorted(m.value for m in a.seen()[-8:]) == sorted(
            f"w{p}-0".encode() for p in range(8))
    finally:
        a.close()
        if b is not None:
            b.stop()


def test_a_stalled_worker_loses_its_leases_and_cannot_commit_after_it_wakes(
        log: KinesisLog) -> None:
    topic = new_topic(log, partitions=2, shards=2)
    produce(log, topic, {0: 5, 1: 5})
    stalled_rec = Recorder()
    stalled = log.consumer("g", [topic], stalled_rec, member="stalled")
    got: list[Message] = []
    wait_until(lambda: len(got) == 10, "messages",
               step=lambda: got.extend(stalled.poll(100, 0.05)))
    tp0 = TopicPartition(topic, 0)
    first = next(m for m in got if m.partition == 0)
    stalled.commit({tp0: first.position})
    # Stalled: no renewals and no polls (a GC pause, a stopped process) past the failover.
    stalled.renewing.clear()
    other = Member(log, "g", topic, "other")
    try:
        took = wait_until(lambda: other.owned() == {0, 1}, "the other takes over")
        assert took >= FAILOVER_MS / 1000 * 0.9  # not before the lease expired
        wait_until(lambda: len(other.seen()) == 9, "the other resumes after the commit")
        # The stalled one wakes: its commit is refused (fenced), and it learns it lost them.
        last = [m for m in got if m.partition == 0][-1]
        stalled.renewing.set()
        stalled.commit({tp0: last.position}, {tp0: "zombie"})
        assert ("lost", [tp0]) in stalled_rec.events  # refused: it learns at once
        stalled.poll(10, 0.01)  # and of the other lease inside the next poll
        lost = {tp for kind, tps in stalled_rec.events if kind == "lost" for tp in tps}
        assert lost == {tp0, TopicPartition(topic, 1)}
        assert other.consumer.committed_metadata(tp0) != "zombie"
        assert log.table("g").scan()  # and the lease table names no zombie commit
        assert all(c.metadata != "zombie" for lease in log.table("g").scan().values()
                   for c in lease.commits.values())
    finally:
        other.close()
        stalled.close()


def test_a_lease_expired_by_our_own_clock_is_lost_before_anyone_takes_it(
        log: KinesisLog) -> None:
    topic = new_topic(log, partitions=1, shards=1)
    rec = Recorder()
    consumer = log.consumer("g", [topic], rec, member="alone")
    try:
        wait_until(lambda: bool(consumer.assignment()), "assigned",
                   step=lambda: consumer.poll(10, 0.05))
        consumer.renewing.clear()
        time.sleep(FAILOVER_MS / 1000 * 1.2)  # the condition: the failover time passing
        consumer.poll(10, 0.01)
        assert rec.kinds()[-1] == "lost" and consumer.assignment() == set()
    finally:
        consumer.close()


class Flow:
    """A producer thread sending rounds (one message per virtual partition, then a flush)
    until stopped; `sent` counts messages per partition."""

    def __init__(self, log: KinesisLog, topic: str, partitions: int):
        self.producer = log.producer()
        self.topic, self.partitions = topic, partitions
        self.sent = dict.fromkeys(range(partitions), 0)
        self.rounds = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for p in range(self.partitions):
                    self.producer.send(self.topic, p, f"v{p}-{self.sent[p]}".encode())
                    self.sent[p] += 1
                self.producer.flush()
                self.rounds += 1
        except BaseException as exc:
            self._error = exc

    def wait_rounds(self, n: int) -> None:
        target = self.rounds + n
        wait_until(lambda: self.rounds >= target or self._error is not None, f"{n} rounds")
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"producer failed: {self._error!r}") from self._error

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(timeout=WAIT_S)
        self.check()
        return self.sent


def _wait_active(log: KinesisLog, stream: str) -> None:
    wait_until(lambda: log.kinesis.describe_stream_summary(StreamName=stream)[
        "StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE", "stream ACTIVE")


@pytest.mark.parametrize("members", [1, 2])
def test_split_and_merge_while_records_flow_lose_and_duplicate_nothing(
        log: KinesisLog, members: int, capsys: pytest.CaptureFixture[str]) -> None:
    partitions = 8
    topic = new_topic(log, partitions=partitions, shards=3)
    stream = log.streams.name(topic)
    group = [Member(log, "g", topic, f"m{i}") for i in range(members)]
    flow = Flow(log, topic, partitions)
    try:
        flow.wait_rounds(5)
        shard0 = log.streams.shards(topic)[0]
        log.kinesis.split_shard(StreamName=stream, ShardToSplit=shard0.id,
                                NewStartingHashKey=str((shard0.start + shard0.end) // 2 + 1))
        _wait_active(log, stream)
        flow.wait_rounds(5)
        one, two = log.streams.shards(topic)[1:3]
        log.kinesis.merge_shards(StreamName=stream, ShardToMerge=one.id,
                                 AdjacentShardToMerge=two.id)
        _wait_active(log, stream)
        flow.wait_rounds(5)
        sent = flow.stop()
        total = sum(sent.values())
        wait_until(lambda: sum(len(m.seen()) for m in group) >= total, "every message")
        seen = [msg for m in group for msg in m.seen()]
        assert len(seen) == total  # nothing duplicated
        for p in range(partitions):
            for m in group:  # each member's messages in order
                own = [msg.position for msg in m.seen() if msg.partition == p]
                assert own == sorted(own)
            mine = sorted((m for m in seen if m.partition == p), key=lambda m: m.position)
            assert [m.value for m in mine] == [f"v{p}-{i}".encode() for i in range(sent[p])]
            # order kept across shards: parents' messages before their children's
            shards = [unpack(m.position).shard for m in mine]
            assert shards == sorted(shards) and len(set(shards)) >= 2
        # Finished parents are checkpointed at SHARD_END (or deleted once children run).
        wait_until(lambda: all(lease.checkpoint != "SHARD_END" or lease.owner is None
                               for lease in log.table("g").scan().values()), "parents done")
        assert {p for m in group for p in m.owned()} == set(range(partitions))
        # Commits followed the partitions into the child leases: each partition's commit is
        # its last message, wherever it is now, and nothing is left to read after it.
        last = {p: max(m.position for m in seen if m.partition == p) for p in range(partitions)}
        wait_until(lambda: {gp.tp.partition: gp.committed for gp in log.group_positions("g")}
                   == last, "every last message committed")
        assert all(gp.lag == 0 for gp in log.group_positions("g"))
        assert any(unpack(position).shard >= 3 for position in last.values())  # in children
    finally:
        flow.stop()
        for m in group:
            m.close()
    view = {row["shard"]: row for row in log.shard_view(topic, "g")}
    assert view["shardId-000000000005"]["parents"] == ["shardId-000000000001",
                                                      "shardId-000000000002"]
    assert view["shardId-000000000000"]["closed"] and not view["shardId-000000000003"]["closed"]
    echo_shards(log, [topic])
    printed = capsys.readouterr().out
    assert "shardId-000000000001,shardId-000000000002" in printed and "CHECKPOINT" in printed
    # the whole lineage is readable per virtual partition, in order, from any position
    for p in range(partitions):
        assert [m.value for m in log.read(topic, p)] == [f"v{p}-{i}".encode()
                                                          for i in range(sent[p])]


CHILD = """
import sys
from topics.backends import open_log
prefix, table, failover, topic = sys.argv[1:5]
log = open_log("kinesis://", kinesis_prefix=prefix, kinesis_lease_table=table,
               kinesis_failover_ms=int(failover))

class Listener:
    def on_assigned(self, tps):
        print("assigned", len(tps), flush=True)
    def on_revoked(self, tps):
        print("revoked", len(tps), flush=True)
    def on_lost(self, tps):
        print("lost", len(tps), flush=True)

consumer = log.consumer("g", [topic], Listener(), member="child")
while True:
    for msg in consumer.poll(100, 0.05):
        consumer.commit({msg.tp: msg.position}, {msg.tp: "child"})
        print("committed", msg.value.decode(), flush=True)
"""


def test_a_process_stopped_past_the_failover_time_is_fenced_when_it_resumes(
        log: KinesisLog, kinesis_env: dict[str, str], tmp_path: Path) -> None:
    topic = new_topic(log, partitions=2, shards=2)
    produce(log, topic, {0: 3, 1: 3})
    out = (tmp_path / "child.out").open("w+")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, log.options.prefix, log.options.lease_table,
         str(FAILOVER_MS), topic], stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, **kinesis_env, "PYTHONPATH": str(Path(__file__).parents[1])})
    parent: Member | None = None
    try:
        def lines() -> list[str]:
            return [line for line in (tmp_path / "child.out").read_text().splitlines()
                    if line.split(" ")[0] in ("assigned", "revoked", "lost", "committed")]

        wait_until(lambda: sum(line.startswith("committed") for line in lines()) == 6,
                   "the child commits everything")
        child.send_signal(signal.SIGSTOP)  # a pause of the whole process: no renewals either
        parent = Member(log, "g", topic, "parent")
        parent.commit = False
        took = wait_until(lambda: parent.owned() == {0, 1}, "the parent takes over")
        assert took >= FAILOVER_MS / 1000 * 0.9
        produce(log, topic, {0: 2, 1: 2}, tag="w")  # for the child to see when it wakes
        paused_at = len(lines())
        child.send_signal(signal.SIGCONT)
        wait_until(lambda: len(lines()) > paused_at, "the child to say something")
        # Inside its first poll after waking, before it processes anything more.
        assert lines()[paused_at].startswith("lost"), lines()[paused_at:]
        child.kill()
        child.wait(timeout=10)
        new = {b"w0-0", b"w0-1", b"w1-0", b"w1-1"}
        # (the parent does not commit: a lease it hands to the woken child and gets back
        # after the kill is read again from the child's last commit)
        wait_until(lambda: parent.owned() == {0, 1}
                   and {m.value for m in parent.seen()} == new,
                   "the parent owns everything and has the new messages")
        last = {tp: max(m.position for m in parent.seen() if m.tp == tp)
                for tp in (TopicPartition(topic, 0), TopicPartition(topic, 1))}
        parent.consumer.commit(last, dict.fromkeys(last, "parent"))
        assert all(parent.consumer.committed(tp) == last[tp] for tp in last)
        assert all(parent.consumer.committed_metadata(tp) == "parent" for tp in last)
    finally:
        child.kill()
        child.wait(timeout=10)
        out.close()
        if parent is not None:
            parent.close()


def test_active_members_are_those_renewing_and_asking_each_group_waits_once(
        log: KinesisLog) -> None:
    topic = new_topic(log, partitions=2, shards=1)
    a = Member(log, "ga", topic, "alive-a")
    b = Member(log, "gb", topic, "alive-b")
    try:
        wait_until(lambda: a.owned() == {0, 1} and b.owned() == {0, 1}, "both own the topic")
        assert log.active_members("ga") == ["alive-a"]
        started = time.monotonic()
        assert log.active_members("gb") == ["alive-b"]  # observed with ga's: no second wait
        assert time.monotonic() - started < FAILOVER_MS / 1000 / 3
        # A member with no lease (one shard, two members) is live all the same.
        idle = Member(log, "ga", topic, "idle-c")
        try:
            wait_until(lambda: log.active_members("ga") == ["alive-a", "idle-c"],
                       "the idle member counted live")
            assert idle.owned() == set() and a.owned() == {0, 1}
        finally:
            idle.close()
        assert log.active_members("ga") == ["alive-a"]  # it left: gone at once
        b.stop()
        b.consumer.renewing.clear()  # a dead worker: its lease stays, its counter stands
        wait_until(lambda: log.active_members("gb") == [], "the stalled member is not live",
                   timeout=WAIT_S)
    finally:
        a.close()
        b.consumer.close()

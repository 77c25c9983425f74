"""Scale-out: three `streams worker` processes share the partitions of each consumer group.
One is SIGKILLed in the middle of a 200k-row batch and another stopped gracefully (SIGTERM)
right after; the last one takes over their partitions, restores their state from the
changelog, and the batch closes once with every output (S3 objects and manifests,
warehouse, load ledger, status table and topics) holding each change exactly once. On the
embedded backend, on Kafka (a Tansu broker of the test's own) and on Kinesis (kinesalite).

DuckDB allows one writing process per file, so the `warehouse` role (and the status sink
that goes with it) runs in one worker only, the keeper, which is never killed; the
processors (segments, pipeline) and the S3 sink run in all three.
"""

from __future__ import annotations

import inspect
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import pytest

from streams.pipeline import group_names
from streams.processor_task import ProcessorTask
from tests.kafka_broker import GROUP_TIMEOUTS, kafka_bootstrap, unique
from tests.support import random_rows, run_cli, write_csv
from tests.test_crash import (
    BOTH_BACKENDS,
    GROUPS,
    KAFKA,
    KILLED,
    KINESIS,
    N_ROWS,
    PARTITIONS,
    Batch,
    Target,
    backend,
    batch_id_from_output,
    batch_is_closed,
    caught_up,
    fresh_kafka_bootstrap,
    group_lags,
    output_of,
    spawn,
    status_of,
    statuses,
    target,
    verify,
    wait_for,
)
from topics.backends import open_log
from topics.log import Message, TopicPartition
from topics.spec import TopicSpec

# fixtures, used by name
__all__ = ["backend", "fresh_kafka_bootstrap", "kafka_bootstrap", "spawn", "target"]

SHARED = ("segments", "pipeline", "s3")
KEEPER = ("w1", (*SHARED, "warehouse"))  # the one warehouse writer: never killed
VICTIM = ("w2", SHARED)
OTHER = ("w3", SHARED)
# The victim kills itself at its first checkpoint that applied rows, once its changelog is
# durable and before its offsets are: it has processed some of its partitions' rows, and
# the batch cannot close before the others take over its partitions.
VICTIM_CRASH_AT = "segments.after_changelog"
# 200 rows a message: 250 messages a partition, more than a processor step takes, so the
# victim dies with rows of its partitions left for the survivors to fold onto the state they
# restored (checked against ProcessorTask.step below).
MESSAGE_ROWS = 200
# Several S3 objects per partition and batch (~30k changes each): a survivor that gets a
# partition back from a rebalance re-reads its open batch and writes its chunks again.
CHUNK_ROWS = 10_000
RESTORED = re.compile(r"^(\S+ \S+) INFO streams\.processor_task: segments: restored "
                      r"audience\.rows\[(\d+)\] \(applied up to (None|\d+), generation \d+\)",
                      re.MULTILINE)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    folder = tmp_path_factory.mktemp("scale-out-inputs")
    rows = random_rows(N_ROWS, users=50_000, segments=3, seed=303)
    return Batch(write_csv(folder / "scale-out.csv", rows), "add", rows)


def members_of(target: Target, groups: list[str]) -> dict[str, list[str]]:
    log = target.open_log()
    try:
        return {group: log.active_members(group) for group in groups}
    finally:
        log.close()


def rebalanced(output: str, since: int) -> bool:
    """In a worker's output after offset `since`: each shared group's last rebalance step is
    an assignment (kafka-python logs "Setting newly assigned partitions"), and it has one."""
    for group in group_names(SHARED):
        steps = [line for line in output[since:].splitlines()
                 if f"group {group}" in line and ("(Re-)joining" in line
                                                  or "newly assigned" in line)]
        if not steps or "newly assigned" not in steps[-1]:
            return False
    return True


def joined(target: Target, members: list[str], roles: tuple[str, ...]) -> bool:
    """Every one of `members` is a live member of every group of `roles`."""
    found = members_of(target, group_names(roles))
    return all(set(members) <= set(live) for live in found.values())


def restores(text: str) -> list[tuple[float, int, int | None]]:
    """(time, partition, applied stamp) of every segments partition a worker restored, from
    its log (`streams -v`: the log's asctime is local time)."""
    return [(datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(partition),
             None if applied == "None" else int(applied))
            for when, partition, applied in RESTORED.findall(text)]


@pytest.mark.parametrize("backend", [*BOTH_BACKENDS, KINESIS])
def test_worker_killed_mid_batch_others_take_over_and_deliver_once(
        tmp_path: Path, target: Target, batch: Batch,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    step = inspect.signature(ProcessorTask.step).parameters["max_messages"].default
    assert step < N_ROWS // PARTITIONS // MESSAGE_ROWS, "a step may take a whole partition"

    def start(member: str, roles: tuple[str, ...], crash_at: str = "") -> subprocess.Popen[bytes]:
        return spawn("-v", "worker", "--roles", ",".join(roles), "--member", member,
                     data_dir=target.data_dir, name=member,
                     env={**target.env(crash_at), "STREAMS_CHUNK_ROWS": str(CHUNK_ROWS)})

    # The victim starts first and joins alone: on the embedded backend a member keeps its
    # fair share (2 of 4 partitions with 3 members) of what it holds, so it surely owns rows
    # partitions when the batch comes; Kafka's range assignor gives each of 3 members 1-2.
    victim = start(VICTIM[0], VICTIM[1], VICTIM_CRASH_AT)
    wait_for(lambda: joined(target, [VICTIM[0]], SHARED) or victim.poll() is not None, 60,
             "the victim to join its groups", interval=target.poll_interval)
    survivors = {name: start(name, roles) for name, roles in (KEEPER, OTHER)}
    everyone = [VICTIM[0], *survivors]
    wait_for(lambda: joined(target, everyone, SHARED), 60, f"{everyone} to join",
             interval=target.poll_interval)
    assert victim.poll() is None, output_of(tmp_path, VICTIM[0])

    imported = run_cli("import", "-q", str(batch.path), data_dir=target.data_dir,
                       env={**target.env(), "STREAMS_MESSAGE_ROWS": str(MESSAGE_ROWS)})
    batch_id = batch_id_from_output(imported.stdout)
    try:
        assert victim.wait(timeout=120) == KILLED, output_of(tmp_path, VICTIM[0])
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the victim did not reach {VICTIM_CRASH_AT} within 120s (did it "
                             f"own rows partitions?):\n{output_of(tmp_path, VICTIM[0])}") from None
    killed_at = time.time()  # just after it died
    if target.backend == KAFKA:
        # Tansu: a member that leaves while its group rebalances around a dead one leaves
        # the group looping at one generation (SyncGroup "rebalance in progress") for good;
        # a real broker completes it. So the stop waits until both survivors have their new
        # assignment in every shared group (the rebalance starts a session timeout after
        # the death, so these offsets are from before it).
        marks = {name: len(output_of(tmp_path, name)) for name in survivors}
        wait_for(lambda: all(rebalanced(output_of(tmp_path, name), mark)
                             for name, mark in marks.items()), 60,
                 "the survivors' new assignments", interval=target.poll_interval)
    # Another worker stopped gracefully mid-batch (SIGTERM, as ECS stops a task): it
    # checkpoints and hands its partitions (leases) over; the keeper finishes the batch.
    other = survivors.pop(OTHER[0])
    other.send_signal(signal.SIGTERM)
    stopping_at = time.time()
    assert other.wait(timeout=60) == 0, output_of(tmp_path, OTHER[0])
    assert "worker stopped cleanly" in output_of(tmp_path, OTHER[0])

    def died() -> bool:  # a survivor that exits ends the waits below at once
        return any(proc.poll() is not None for proc in survivors.values())

    wait_for(lambda: died() or batch_is_closed(target, batch_id), 180,
             f"batch {batch_id} to close", interval=0.5)
    # Closed in the status view; let the workers also fold the last events and deliver the
    # last snapshots, then stop them cleanly.
    wait_for(lambda: died() or caught_up(target), 60, f"groups {list(GROUPS)} to catch up",
             interval=target.poll_interval)
    for name, proc in survivors.items():
        assert proc.poll() is None, f"{name} exited early:\n{output_of(tmp_path, name)}"
        proc.send_signal(signal.SIGTERM)
    for name, proc in survivors.items():
        assert proc.wait(timeout=30) == 0, output_of(tmp_path, name)
        assert "worker stopped cleanly" in output_of(tmp_path, name)

    # The victim died having applied rows (its crash point is in a checkpoint that had some).
    # The survivors took partitions over after the kill and restored the state their
    # changelog held (stamped: rows had been applied there).
    taken_over = [(p, applied) for name in (*survivors, OTHER[0])
                  for when, p, applied in restores(output_of(tmp_path, name))
                  if when >= killed_at - 0.05 and applied is not None]  # log times: ms
    assert taken_over, "no survivor restored a partition with applied rows after the kill"

    status = status_of(statuses(target), batch.path)
    assert status["closed_at"] > stopping_at * 1000 > killed_at * 1000, (
        f"batch closed at {status['closed_at']}, before the victim was killed at "
        f"{killed_at * 1000:.0f} or the other worker stopped at {stopping_at * 1000:.0f}: "
        "the kill and the stop were not in the middle of the batch")
    verify(target, [batch])
    lags = group_lags(target)
    assert all(lag == 0 for lag in lags.values()), (
        f"cleanly stopped workers left consumed messages uncommitted: {lags}")


# -- found by the test above -------------------------------------------------------------------


def test_a_partition_assigned_back_by_a_rebalance_resumes_after_its_commit(
        kafka_bootstrap: str) -> None:
    """Regression, found by the Kafka scale-out test: a rebalance revokes every partition
    (eager protocol) and the runtime drops their state, but kafka-python 3 kept the fetch
    position of a partition assigned back to the same member, so a sink went on mid-batch
    without the batch's start and failed it with a count mismatch. A partition assigned
    again must resume after its committed position, as one assigned to another member."""
    log = open_log(f"kafka://{kafka_bootstrap}", **GROUP_TIMEOUTS)
    topic, group = unique("reassigned"), unique("g")
    log.ensure_topics([TopicSpec(topic, 2, ("X",))])
    producer = log.producer()
    for partition in (0, 1):
        for i in range(10):
            producer.send(topic, partition, f"{partition}-{i}".encode())
    producer.flush()
    first, second = Assignments(), Assignments()
    a = log.consumer(group, [topic], first, member="a")
    stop = threading.Event()
    b_thread: threading.Thread | None = None
    try:
        read: list[Message] = []
        wait_for(lambda: read.extend(a.poll(100, 0.05)) or len(read) == 20, 30,
                 "a to read both partitions")
        p0 = TopicPartition(topic, 0)
        a.commit({p0: 2})  # processed up to position 2 of partition 0, then b joins
        b = log.consumer(group, [topic], second, member="b")

        def poll_b() -> None:
            while not stop.is_set():
                b.poll(100, 0.05)

        b_thread = threading.Thread(target=poll_b, name="member-b", daemon=True)
        b_thread.start()
        again: list[Message] = []

        def reread() -> bool:
            got = a.poll(100, 0.05)
            if first.count >= 2:  # the rebalance's assignment ran inside this poll or before
                again.extend(got)
            return second.count >= 1 and len([m for m in again if m.partition == 0]) >= 7

        wait_for(reread, 30, "a to read partition 0 again after the rebalance (it resumed "
                 "where it had been instead of after its commit)")
        # The range assignor gives member "a" partition 0 back (members sorted by id).
        assert first.last == [p0] and a.assignment() == {p0}, (first.last, second.last)
        assert [m.position for m in again if m.partition == 0] == list(range(3, 10))
    finally:
        stop.set()
        if b_thread is not None:
            b_thread.join(timeout=30)
            b.close()
        a.close()
        log.close()


class Assignments:
    """A rebalance listener that counts assignments and keeps the last one."""

    def __init__(self) -> None:
        self.count = 0
        self.last: list[TopicPartition] = []

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        self.count += 1
        self.last = list(tps)

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        pass

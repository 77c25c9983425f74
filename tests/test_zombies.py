"""Zombies: a worker paused (SIGSTOP) past its session timeout loses its partitions to
another worker, which restores them and finishes the batch; then the paused one is woken
(SIGCONT) and goes on from where it stopped, flushing what it held. Nothing it writes after
it lost the partitions may count: its changelog entries are void (a newer owner claimed
the partition), its commits are refused, its outputs are duplicates the sinks skip. State
and outputs must be exact, and `streams verify` must agree. On embedded, Kafka and Kinesis
(there the lease's failover time, STREAMS_KINESIS_FAILOVER_MS, plays the session timeout).

The pause lands on a condition, never on a guess about timing: the worker stops itself at a
named point (STREAMS_PAUSE_AT, streams/faults.py), right after it flushed a checkpoint's
outputs and before its changelog entries and offsets, the worst place to be frozen in.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from streams.state.changelog import CLAIM, ENTRY
from tests.support import random_rows, run_cli, write_csv
from tests.test_crash import (
    BOTH_BACKENDS,
    GROUPS,
    KINESIS,
    N_ROWS,
    Batch,
    Target,
    backend,
    batch_id_from_output,
    batch_is_closed,
    caught_up,
    fresh_kafka_bootstrap,
    output_of,
    spawn,
    target,
    verify,
    wait_for,
)
from topics.codec import decode, schema_name
from topics.spec import SEGMENTS_CHANGELOG

__all__ = ["backend", "fresh_kafka_bootstrap", "spawn", "target"]  # fixtures, by name

SESSION = {"STREAMS_EMBEDDED_SESSION_TIMEOUT_MS": "1000"}  # Kafka: GROUP_TIMEOUTS (2 s)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    rows = random_rows(N_ROWS, users=50_000, segments=3, seed=404)
    return Batch(write_csv(tmp_path_factory.mktemp("zombie") / "zombie.csv", rows), "add", rows)


def stopped(proc: subprocess.Popen[bytes]) -> bool:
    """The process is in state T (stopped by a signal)."""
    try:
        with open(f"/proc/{proc.pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def zombie_entries(target: Target) -> int:
    """Changelog entries written under a generation lower than a claim before them."""
    log = target.open_log()
    try:
        void = 0
        for partition in log.partitions(SEGMENTS_CHANGELOG):
            floor = 0
            for msg in log.read(SEGMENTS_CHANGELOG, partition):
                name = schema_name(msg.value)
                if name == CLAIM:
                    floor = max(floor, decode(msg.value)[1]["generation"])
                elif name == ENTRY and decode(msg.value)[1]["generation"] < floor:
                    void += 1
        return void
    finally:
        log.close()


@pytest.mark.parametrize("backend", [*BOTH_BACKENDS, KINESIS])
def test_a_paused_worker_loses_its_partitions_and_its_late_writes_count_for_nothing(
        tmp_path: Path, target: Target, batch: Batch,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    env = {**target.env(), **SESSION, "STREAMS_MESSAGE_ROWS": "500"}

    def start(member: str, roles: str, **extra: str) -> subprocess.Popen[bytes]:
        return spawn("worker", "--roles", roles, "--member", member, data_dir=target.data_dir,
                     name=member, env={**env, **extra})

    keeper = start("keeper", "pipeline,s3,warehouse")
    zombie = start("zombie", "segments", STREAMS_PAUSE_AT="segments.after_outputs:2")
    imported = run_cli("import", "-q", str(batch.path), data_dir=target.data_dir, env=env)
    batch_id = batch_id_from_output(imported.stdout)
    wait_for(lambda: stopped(zombie) or zombie.poll() is not None, 120,
             "the zombie to pause itself after a checkpoint's outputs")
    assert zombie.poll() is None, output_of(tmp_path, "zombie")

    heir = start("heir", "segments")
    wait_for(lambda: batch_is_closed(target, batch_id) or heir.poll() is not None, 180,
             f"the heir to take the partitions over and close batch {batch_id}",
             interval=target.poll_interval)
    assert heir.poll() is None, output_of(tmp_path, "heir")

    zombie.send_signal(signal.SIGCONT)
    wait_for(lambda: "lost" in output_of(tmp_path, "zombie") or zombie.poll() is not None,
             60, "the woken zombie to find out it lost its partitions")
    assert zombie.poll() is None, output_of(tmp_path, "zombie")
    # It really did flush what it held when it woke: entries under its old generation.
    assert zombie_entries(target) > 0, output_of(tmp_path, "zombie")

    wait_for(lambda: caught_up(target), 120, f"groups {list(GROUPS)} to catch up",
             interval=target.poll_interval)
    for name, proc in (("zombie", zombie), ("heir", heir), ("keeper", keeper)):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, output_of(tmp_path, name)
    verify(target, [batch])  # ends with `streams verify`

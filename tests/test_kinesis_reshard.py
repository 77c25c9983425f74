"""Resharding in the middle of a batch, through the real pipeline on Kinesis (kinesalite for
the streams, the moto server for the lease tables).

`streams run` stops itself (SIGSTOP, `STREAMS_PAUSE_AT=import.publishing:N`) after part of
the batch's row messages are put; the test then splits one shard of the rows stream and
merges two others, and wakes the process. The importer's shard map is stale (its next
aggregates land in the children), and the segments processor reaches SHARD_END on three
parents mid-batch and goes on in the children. The batch must close once and every output
(warehouse, S3 objects and manifests, load ledger, status topic) must hold each change once:
the same checks as the crash tests (tests/test_crash.py `verify`), ending with
`streams verify`.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import random_rows, run_cli, write_csv
from tests.test_crash import KINESIS, Batch, Target, output_of, spawn, target, verify, wait_for
from topics.backends.kinesis.envelope import hash_key_of
from topics.backends.kinesis.log import KinesisLog
from topics.backends.kinesis.positions import unpack
from topics.backends.kinesis.shard_sync import stream_leases
from topics.spec import ROWS, SPECS

# fixtures, used by name
__all__ = ["spawn", "target"]

N_ROWS = 60_000
# 1000 rows a message, 15 messages a partition -> 60 row messages, a pause point every 16:
# the pause lands after 32 of them, half the batch.
PAUSE_AT = "import.publishing:2"
MESSAGE_ROWS = 1000  # this test's own (the crash tests' TUNING has smaller messages)
WAIT_S = 180.0


def stopped(proc: subprocess.Popen[bytes]) -> bool:
    """The process stopped itself at its pause point (state T in /proc)."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


def wait_active(log: KinesisLog, stream: str) -> None:
    wait_for(lambda: log.kinesis.describe_stream_summary(StreamName=stream)[
        "StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE", WAIT_S, "stream ACTIVE",
        interval=0.05)


def split_and_merge(log: KinesisLog) -> None:
    """Splits the shard of virtual partition 0 below its hash key (the partition moves to
    the upper child) and merges the shards of partitions 2 and 3 (both move to the child)."""
    stream = log.streams.name(ROWS)
    partitions = SPECS[ROWS].partitions
    shards = log.streams.shards(ROWS)
    assert len(shards) == partitions and not any(s.closed for s in shards), shards
    first = next(s for s in shards if s.holds(hash_key_of(0, partitions)))
    log.kinesis.split_shard(StreamName=stream, ShardToSplit=first.id,
                            NewStartingHashKey=str((first.start + hash_key_of(0, partitions))
                                                   // 2))
    wait_active(log, stream)
    two, three = (next(s for s in shards if s.holds(hash_key_of(p, partitions)))
                  for p in (2, 3))
    log.kinesis.merge_shards(StreamName=stream, ShardToMerge=two.id,
                             AdjacentShardToMerge=three.id)
    wait_active(log, stream)


@pytest.mark.parametrize("backend", [KINESIS])
def test_split_and_merge_mid_batch_close_it_once_with_exact_outputs(
        target: Target, tmp_path: Path,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    rows = random_rows(N_ROWS, users=20_000, segments=3, seed=303)
    batch = Batch(write_csv(tmp_path / "batch.csv", rows), "add", rows)
    # a failover time far above the pause: the leases stay ours while the test reshards
    env = {**target.env(), "STREAMS_PAUSE_AT": PAUSE_AT, "STREAMS_KINESIS_FAILOVER_MS": "30000",
           "STREAMS_MESSAGE_ROWS": str(MESSAGE_ROWS)}
    proc = spawn("run", "-q", str(batch.path), data_dir=target.data_dir, env=env, name="run")
    wait_for(lambda: proc.poll() is not None or stopped(proc), WAIT_S, "the pause point")
    assert proc.poll() is None, output_of(tmp_path, "run")

    log = target.open_log()
    assert isinstance(log, KinesisLog)
    try:
        before = {s.id for s in log.streams.shards(ROWS)}
        split_and_merge(log)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=WAIT_S) == 0, output_of(tmp_path, "run")
        verify(target, [batch])

        # The reshard really was mid-batch: rows of partitions 0 and 2 went both to their
        # closed parent and to its open child (more there than the end marker).
        shards = log.streams.shards(ROWS)
        children = {s.index for s in shards if s.id not in before}
        assert len(children) == 3 and sum(s.closed for s in shards) == 3, shards
        for partition in (0, 2):
            per_shard = Counter(unpack(msg.position).shard for msg in log.read(ROWS, partition))
            parent, child = sorted(per_shard)
            assert child in children and parent not in children, per_shard
            assert per_shard[parent] >= 1 and per_shard[child] >= 2, per_shard
        # The segments processor finished the parents: each is checkpointed at SHARD_END,
        # or its lease already deleted (its children run); the children have leases.
        leases = stream_leases(log.table("processor-segments").scan(),
                               log.streams.name(ROWS))
        for shard in shards:
            if shard.closed:
                assert shard.id not in leases or leases[shard.id].finished, leases[shard.id]
            else:
                assert shard.id in leases, f"open shard {shard.id} has no lease"
        # `streams topics` shows the lineage and each lease's lag in ms beside its owner and
        # checkpoint (kinesalite: 0 for an open shard; finished parents are 0 behind).
        printed = run_cli("topics", data_dir=target.data_dir, env=target.env()).stdout
        lines = printed.splitlines()
        for child in (s for s in shards if s.id not in before):
            assert any(line.split()[:2] == [ROWS, child.id] and ",".join(child.parents)
                       in line for line in lines), printed
        header = next(line for line in lines if line.startswith("GROUP") and "LAG MS" in line)
        rows = [line.split() for line in lines[lines.index(header) + 1:]
                if line.startswith("processor-segments ") and f" {ROWS} " in line]
        assert {row[2] for row in rows} == set(leases), printed
        for row in rows:
            assert row[-2].isdigit() and (row[-1] != "SHARD_END" or row[-2] == "0"), row
    finally:
        log.close()

"""Scale-out with a PostgreSQL warehouse: three `streams worker` processes, every one with
every role (the warehouse and its status sink too: PostgreSQL takes many writers, where
DuckDB's one writer pins that role to one worker in test_scale_out.py), on the embedded
backend. The victim SIGKILLs itself inside its first merge transaction, before the commit
(crash point `postgres.inside_merge`), while it holds that partition's advisory lock; the
survivors take its partitions over, stage their open batch again and merge it, and the
batch closes once with every output exact: the warehouse table equals the independent
model, the load ledger holds each (batch, partition) once, staging is empty, the S3
objects (local, or on moto's S3) fold to the model, and `streams verify` agrees.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streams.pipeline import ROLES
from tests.aws_server import aws_env, make_bucket, moto_endpoint
from tests.support import random_rows, run_cli, write_csv
from tests.test_crash import (
    GROUPS,
    KILLED,
    Batch,
    Target,
    batch_id_from_output,
    batch_is_closed,
    caught_up,
    group_lags,
    output_of,
    spawn,
    status_of,
    statuses,
    verify,
    wait_for,
)
from tests.test_scale_out import joined

__all__ = ["aws_env", "moto_endpoint", "spawn"]  # fixtures, used by name

N_ROWS = 60_000
MESSAGE_ROWS = 200
# ~11k changes a partition: 4 chunks each, so a partition taken over mid-batch has chunks
# of its open batch staged by the victim (dropped) and staged again by its new owner.
CHUNK_ROWS = 3_000
VICTIM_CRASH_AT = "postgres.inside_merge"  # its first merge, before the commit
NAMES = ("w1", "w2", "w3")
# Every role but the DynamoDB status mirror (no --status-table here).
WORKER_ROLES = tuple(role for role in ROLES if role != "status-table")


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    folder = tmp_path_factory.mktemp("scale-out-postgres-inputs")
    rows = random_rows(N_ROWS, users=20_000, segments=3, seed=909)
    return Batch(write_csv(folder / "scale-out-postgres.csv", rows), "add", rows)


@pytest.fixture(params=["local-objects", "s3-objects"])
def target(tmp_path: Path, postgres_url: str, request: pytest.FixtureRequest) -> Target:
    """The warehouse on PostgreSQL; the objects in the local layout, or on S3 (moto's
    server), where the three workers' batch manifest puts race on one bucket."""
    if request.param == "s3-objects":
        aws = request.getfixturevalue("aws_env")
        return Target(tmp_path / "data", s3_root=f"s3://{make_bucket()}/out",
                      warehouse=postgres_url, aws=aws)
    return Target(tmp_path / "data", warehouse=postgres_url)


def test_three_postgres_warehouse_workers_one_killed_mid_merge_deliver_once(
        tmp_path: Path, target: Target, batch: Batch,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    def start(member: str, crash_at: str = "") -> subprocess.Popen[bytes]:
        return spawn("-v", "worker", "--roles", ",".join(WORKER_ROLES), "--member", member,
                     data_dir=target.data_dir, name=member,
                     env={**target.env(crash_at), "STREAMS_CHUNK_ROWS": str(CHUNK_ROWS)})

    # The victim joins alone first: on the embedded backend a member keeps its fair share
    # (2 of 4 partitions with 3 members) of what it holds, so it surely owns warehouse
    # partitions, and so merges, when the batch comes.
    victim_name, *others = NAMES
    victim = start(victim_name, VICTIM_CRASH_AT)
    wait_for(lambda: joined(target, [victim_name], WORKER_ROLES) or victim.poll() is not None, 60,
             "the victim to join its groups")
    survivors = {name: start(name) for name in others}
    wait_for(lambda: joined(target, list(NAMES), WORKER_ROLES), 60, f"{NAMES} to join")
    assert victim.poll() is None, output_of(tmp_path, victim_name)

    imported = run_cli("import", "-q", str(batch.path), data_dir=target.data_dir,
                       env={**target.env(), "STREAMS_MESSAGE_ROWS": str(MESSAGE_ROWS)})
    batch_id = batch_id_from_output(imported.stdout)
    try:
        assert victim.wait(timeout=120) == KILLED, output_of(tmp_path, victim_name)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the victim did not reach {VICTIM_CRASH_AT} within 120s (did it "
                             f"own warehouse partitions?):\n{output_of(tmp_path, victim_name)}"
                             ) from None
    killed_at = time.time()  # just after it died (a survivor may take over at once)

    def died() -> bool:  # a survivor that exits ends the waits below at once
        return any(proc.poll() is not None for proc in survivors.values())

    wait_for(lambda: died() or batch_is_closed(target, batch_id), 180,
             f"batch {batch_id} to close", interval=0.5)
    wait_for(lambda: died() or caught_up(target), 60, f"groups {list(GROUPS)} to catch up")
    for name, proc in survivors.items():
        assert proc.poll() is None, f"{name} exited early:\n{output_of(tmp_path, name)}"
        proc.send_signal(signal.SIGTERM)
    for name, proc in survivors.items():
        assert proc.wait(timeout=30) == 0, output_of(tmp_path, name)
        assert "worker stopped cleanly" in output_of(tmp_path, name)

    # The victim's merge was rolled back with its connection (else its ledger row, of before
    # the kill, would keep the partition from merging again): a survivor merged that
    # partition, so its ledger row is from after the kill.
    after_kill = datetime.fromtimestamp(killed_at, UTC).replace(tzinfo=None)
    late = target.query("SELECT partition FROM load_ledger WHERE batch_id = ?"
                        " AND loaded_at >= ?", [batch_id, after_kill])
    assert late, "no partition was merged after the victim was killed"
    status = status_of(statuses(target), batch.path)
    assert status["closed_at"] > killed_at * 1000
    # Each (batch, partition) once in the ledger, the warehouse and the S3 objects equal to
    # the model, staging empty, and `streams verify` agreeing (tests/test_crash.verify).
    verify(target, [batch])
    lags = group_lags(target)
    assert all(lag == 0 for lag in lags.values()), (
        f"cleanly stopped workers left consumed messages uncommitted: {lags}")

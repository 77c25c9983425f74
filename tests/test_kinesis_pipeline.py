"""The whole pipeline through the CLI on the Kinesis backend (kinesalite for the streams,
the moto server for the lease tables): the same inputs and expected outputs as on the
embedded backend, ending with `streams verify`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.aws_server import unique_name
from tests.support import expected_members, random_rows, run_cli, warehouse_members, write_csv


def kinesis_cli_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "STREAMS_BACKEND": "kinesis",
            "STREAMS_KINESIS_PREFIX": unique_name("e2e") + ".",
            "STREAMS_KINESIS_LEASE_TABLE": unique_name("leases"),
            "STREAMS_KINESIS_FAILOVER_MS": "3000", "STREAMS_KINESIS_SHARDS": "2"}


def test_run_replace_and_verify_on_kinesis(tmp_path: Path, kinesis_env: dict[str, str]) -> None:
    env = kinesis_cli_env(kinesis_env)
    data_dir = tmp_path / "data"
    first = random_rows(5_000, users=1_000, segments=3, seed=21)
    second = [(u, "seg-1", "add") for u, _s, _o in random_rows(800, 1_000, 1, seed=22)]
    batches = [("add", first), ("replace", second)]
    paths = [write_csv(tmp_path / "first.csv", first),
             write_csv(tmp_path / "second.csv", second, with_op=False)]

    run_cli("run", "-q", str(paths[0]), data_dir=data_dir, env=env)
    run_cli("run", "-q", str(paths[1]), "--segment", "seg-1", "--mode", "replace",
            data_dir=data_dir, env=env)
    assert warehouse_members(data_dir) == sorted(expected_members(batches))
    status = json.loads(run_cli("status", "--json", data_dir=data_dir, env=env).stdout)
    assert [s["status"] for s in status] == ["closed", "closed"]
    assert [s["rows"] for s in status] == [5_000, 800]
    verified = run_cli("verify", data_dir=data_dir, env=env)
    assert "no differences" in verified.stdout
    replayed = run_cli("replay", "--from", "earliest", "-q", data_dir=data_dir, env=env)
    assert "replayed from earliest" in replayed.stdout
    assert warehouse_members(data_dir) == sorted(expected_members(batches))
    assert "no differences" in run_cli("verify", data_dir=data_dir, env=env).stdout

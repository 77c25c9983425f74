"""The whole pipeline through the CLI on the Kafka backend (a fresh Tansu broker per test):
the same inputs and the same expected outputs as on the embedded backend."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.kafka_broker import fresh_kafka_bootstrap
from tests.support import expected_members, random_rows, run_cli, warehouse_members, write_csv

__all__ = ["fresh_kafka_bootstrap"]  # the fixture, used by name


def kafka_env(bootstrap: str) -> dict[str, str]:
    return {"STREAMS_BACKEND": "kafka", "STREAMS_BOOTSTRAP": bootstrap,
            "STREAMS_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "STREAMS_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}


def s3_digest(data_dir: Path) -> dict[str, str]:
    root = data_dir / "s3"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_replace_and_replay_on_kafka(tmp_path: Path, fresh_kafka_bootstrap: str) -> None:
    env = kafka_env(fresh_kafka_bootstrap)
    data_dir = tmp_path / "data"
    first = random_rows(20_000, users=5_000, segments=3, seed=11)
    second = [(u, "seg-1", "add") for u, _s, _o in random_rows(3_000, 5_000, 1, seed=12)]
    batches = [("add", first), ("replace", second)]
    paths = [write_csv(tmp_path / "first.csv", first),
             write_csv(tmp_path / "second.csv", second, with_op=False)]

    run_cli("run", "-q", str(paths[0]), data_dir=data_dir, env=env)
    run_cli("run", "-q", str(paths[1]), "--segment", "seg-1", "--mode", "replace",
            data_dir=data_dir, env=env)
    expected = sorted(expected_members(batches))
    assert warehouse_members(data_dir) == expected
    status = json.loads(run_cli("status", "--json", data_dir=data_dir, env=env).stdout)
    assert [s["status"] for s in status] == ["closed", "closed"]
    assert [s["rows"] for s in status] == [20_000, 3_000]

    again = run_cli("run", "-q", str(paths[0]), data_dir=data_dir, env=env)
    assert "nothing changed" in again.stdout

    before = s3_digest(data_dir)
    replayed = run_cli("replay", "--from", "earliest", "-q", data_dir=data_dir, env=env)
    assert "replayed from earliest" in replayed.stdout
    assert warehouse_members(data_dir) == expected
    assert s3_digest(data_dir) == before
    topics = run_cli("topics", data_dir=data_dir, env=env).stdout
    assert "audience.rows" in topics and "sink-warehouse" in topics

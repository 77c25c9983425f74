"""Replay rebuilds the sinks from the replayed outputs (issue 7, hole 7): a replay after a
processor fix changes what the warehouse and the S3 objects hold, because the outputs the
replay supersedes are void (a ReplayFence and a higher epoch in every replayed output); on
the local layout + DuckDB and on S3 (moto) + PostgreSQL. And a replay refused for a running
worker changes nothing at all."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import streams.pipeline as pipeline_module
from connectors.importer import ImportResult
from connectors.object_store import open_store
from connectors.s3_fold import fold_objects
from connectors.warehouses import open_warehouse
from processors.segments import AudienceSegments
from streams.api import Input, Output, Table
from streams.pipeline import ROLES, Pipeline
from streams.settings import Settings
from streams.state.changelog import FENCE
from tests.aws_server import aws_env, make_bucket, moto_endpoint, unique_name
from tests.kinesis_server import kinesis_endpoint, kinesis_env
from tests.support import expected_members, run_cli, write_csv
from topics.codec import schema_name
from topics.spec import CHANGES, SEGMENTS_CHANGELOG

__all__ = ["aws_env", "kinesis_endpoint", "kinesis_env", "moto_endpoint"]  # fixtures

ROWS = [(f"u{i}", "s", "add") for i in range(40)] + [("u3", "s", "remove")]


class ForgetfulSegments(AudienceSegments):
    """A processor with a bug: it never adds user u7."""

    def process(self, tables: dict[str, Table[Any]], record: Input) -> list[Output]:
        if record.schema == "AudienceRows":
            value = dict(record.value)
            keep = [i for i, user in enumerate(value["user_id_column"].split("\n"))
                    if user != "u7"]
            from topics.columns import read_columns, write_columns

            rows = read_columns(value)
            value.update(write_columns([rows.seqs[i] for i in keep],
                                       [rows.user_ids[i] for i in keep],
                                       [rows.segment_ids[i] for i in keep],
                                       [rows.ops[i] for i in keep]))
            record = Input(record.schema, value, record.partition, record.position,
                           record.timestamp_ms)
        return super().process(tables, record)


def _run(pipe: Pipeline, path: Path) -> ImportResult:
    result = pipe.importer().run(pipe.import_request(str(path)))
    worker = pipe.worker(ROLES, member="test")

    def closed() -> bool:
        status = pipe.batches().get(result.batch_id)
        return status is not None and status.finished

    assert worker.run(until=closed, timeout_s=120), "the batch did not finish"
    return result


@pytest.fixture(params=["local", "s3-postgres"])
def outputs(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings of the sinks' targets: the local layout and DuckDB, or S3 (moto's server, a
    bucket of the test's own) and PostgreSQL (a database of the test's own)."""
    if request.param == "local":
        return {}
    request.getfixturevalue("aws_env")  # in os.environ, for this process and `streams`
    return {"s3_root": f"s3://{make_bucket()}/out",
            "warehouse": request.getfixturevalue("postgres_url")}


def test_replay_after_a_processor_fix_changes_the_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outputs: dict[str, str]) -> None:
    settings = Settings(data_dir=tmp_path / "data", chunk_rows=7, s3_root=outputs.get("s3_root"),
                        warehouse=outputs.get("warehouse"))
    env = {f"STREAMS_{name.upper()}": value for name, value in outputs.items()}
    path = write_csv(tmp_path / "in.csv", ROWS)
    monkeypatch.setattr(pipeline_module, "AudienceSegments", ForgetfulSegments)
    fixed = expected_members([("add", ROWS)])
    pipe = Pipeline(settings)
    try:
        _run(pipe, path)
        assert ("s", "u7") not in set(pipe.warehouse.members())  # the bug, delivered
        assert ("s", "u7") not in _objects(settings)
        batch = next(iter(pipe.batches()))
    finally:
        pipe.close()
    # The fix is what `streams` runs: the replay is the command's own.
    replayed = run_cli("replay", "--from", "earliest", "-q", data_dir=settings.data_dir,
                       env=env)
    assert "epoch 1" in replayed.stdout
    _check_outputs(settings, env, fixed)
    # a second replay, from a batch, is epoch 2 and changes nothing more
    replayed = run_cli("replay", "--from", f"batch:{batch}", "-q",
                       data_dir=settings.data_dir, env=env)
    assert "epoch 2" in replayed.stdout
    _check_outputs(settings, env, fixed)


def _objects(settings: Settings) -> set[tuple[str, str]]:
    """The membership the S3 sink's objects fold to."""
    return fold_objects(open_store(settings.object_root), settings.s3_prefix)


def _check_outputs(settings: Settings, env: dict[str, str],
                   expected: set[tuple[str, str]]) -> None:
    """The warehouse and the S3 objects hold `expected`, and `streams verify` agrees."""
    warehouse = open_warehouse(settings.warehouse_url, **(
        settings.warehouse_options() if settings.warehouse else {}))
    try:
        members = warehouse.members()
    finally:
        warehouse.close()
    assert len(members) == len(set(members)) and set(members) == expected
    assert _objects(settings) == expected
    checked = run_cli("verify", data_dir=settings.data_dir, env=env, check=False)
    assert checked.returncode == 0 and "no differences" in checked.stdout, (
        checked.stdout + checked.stderr)


def test_replay_is_refused_before_anything_is_reset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_csv(tmp_path / "in.csv", ROWS)
    run_cli("run", "-q", str(path), data_dir=data)
    before = run_cli("verify", data_dir=data)
    assert "no differences" in before.stdout
    fences = _fences(data)
    env = {"STREAMS_DATA_DIR": str(data)}
    worker = subprocess.Popen([sys.executable, "-m", "streams", "worker", "--roles", "pipeline",
                               "--member", "busy"], cwd=tmp_path, env={**_environ(), **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_line(worker, b"worker running")
        refused = run_cli("replay", "--from", "earliest", data_dir=data, check=False)
        assert refused.returncode == 1 and "stop the workers first" in refused.stderr
        assert "processor-pipeline: busy" in refused.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert _fences(data) == fences  # nothing written to the log
    after = run_cli("verify", data_dir=data)  # nor to the warehouse
    assert after.stdout == before.stdout


def _fences(data: Path) -> int:
    from topics.backends.embedded.log import EmbeddedLog

    log = EmbeddedLog(data / "log")
    try:
        return sum(schema_name(m.value) in (FENCE, "ReplayFence")
                   for topic in (SEGMENTS_CHANGELOG, CHANGES)
                   for p in log.partitions(topic) for m in log.read(topic, p))
    finally:
        log.close()


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def _wait_line(proc: subprocess.Popen[bytes], text: bytes, timeout_s: float = 60) -> None:
    """Reads the process's output until `text` shows (bounded)."""
    import os
    import select
    import time

    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout_s
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} from the worker within {timeout_s}s: {seen!r}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"the worker exited before it ran: {seen!r}"
            seen += chunk


@pytest.fixture(params=["embedded", "kinesis"])
def log_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """A pipeline's settings on the embedded log, or on Kinesis (kinesalite, 2 shards and 4
    virtual partitions, leases on the moto server), with streams of the test's own."""
    if request.param == "embedded":
        return Settings(data_dir=tmp_path / "data")
    request.getfixturevalue("kinesis_env")
    return _kinesis_settings(tmp_path)


def _kinesis_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", backend="kinesis",
                    kinesis_prefix=unique_name("replay") + ".",
                    kinesis_lease_table=unique_name("leases"), kinesis_failover_ms=3000,
                    kinesis_shards=2)


def _two_batches_apart(pipe: Pipeline, tmp_path: Path) -> tuple[int, ImportResult]:
    """Two batches, the second one appended after WHEN and the first one before: WHEN."""
    import time

    first = _run(pipe, write_csv(tmp_path / "a.csv", [(f"a{i}", "s1", "add") for i in range(300)]))
    between = time.time_ns() // 1_000_000 + 1
    while time.time_ns() // 1_000_000 <= between:  # the clock past WHEN, then batch 2
        time.sleep(0.001)
    second = _run(pipe, write_csv(tmp_path / "b.csv", [(f"b{i}", "s2", "add") for i in range(300)]))
    assert first.batch_id != second.batch_id
    return between, second


def test_replay_from_a_time_starts_each_partition_at_its_first_later_message(
        tmp_path: Path, log_settings: Settings) -> None:
    """`--from time:WHEN`: every partition from its first message appended at or after
    WHEN, which here is where the second batch begins (the first one is all before it). On
    Kinesis the lookup starts from AT_TIMESTAMP iterators."""
    import time

    from streams.replay import plan
    from topics.spec import ROWS

    pipe = Pipeline(log_settings)
    try:
        between, second = _two_batches_apart(pipe, tmp_path)
        by_time = plan(pipe.log, ROWS, f"time:{between}")
        assert by_time.starts == plan(pipe.log, ROWS, f"batch:{second.batch_id}").starts
        assert all(start is not None for start in by_time.starts.values())
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(between // 1000))
        assert plan(pipe.log, ROWS, f"time:{iso}Z").starts == \
            plan(pipe.log, ROWS, f"time:{between // 1000 * 1000}").starts
        later = plan(pipe.log, ROWS, f"time:{time.time_ns() // 1_000_000 + 60_000}")
        assert set(later.starts.values()) == {None}  # nothing to reprocess
        with pytest.raises(ValueError, match=r"time:yesterday: expected an ISO 8601 time"):
            plan(pipe.log, ROWS, "time:yesterday")
        if log_settings.backend == "embedded":
            with pytest.raises(ValueError, match=r"sequence numbers are Kinesis's"):
                plan(pipe.log, ROWS, "sequence:123")
    finally:
        pipe.close()


def test_replay_from_a_kinesis_sequence_number_starts_at_that_record(
        tmp_path: Path, kinesis_env: dict[str, str]) -> None:
    """`--from sequence:SEQ` with SEQ the first record of the second batch to arrive: the
    partitions of its shard start at it, the others at their first record that arrived
    then or later; together, where the second batch begins. Then the replay itself, by the
    command, delivers the same outputs and `streams verify` agrees."""
    from streams.replay import plan
    from topics.backends.kinesis.positions import unpack
    from topics.spec import ROWS

    settings = _kinesis_settings(tmp_path)
    pipe = Pipeline(settings)
    try:
        _between, second = _two_batches_apart(pipe, tmp_path)
        by_batch = plan(pipe.log, ROWS, f"batch:{second.batch_id}").starts
        firsts = [pipe.log.read_at(ROWS, p, start) for p, start in by_batch.items()
                  if start is not None]
        assert len(firsts) == len(by_batch)
        earliest = min(firsts, key=lambda m: m.timestamp_ms)
        sequence = unpack(earliest.position).sequence
        assert plan(pipe.log, ROWS, f"sequence:{sequence}").starts == by_batch
        with pytest.raises(ValueError, match=r"no record of stream .* has that sequence"):
            plan(pipe.log, ROWS, f"sequence:{sequence + 10**30}")
        with pytest.raises(ValueError, match=r"expected the decimal sequence number"):
            plan(pipe.log, ROWS, "sequence:49x")
        expected = expected_members([("add", [(f"a{i}", "s1", "add") for i in range(300)]),
                                     ("add", [(f"b{i}", "s2", "add") for i in range(300)])])
    finally:
        pipe.close()
    env = {"STREAMS_BACKEND": "kinesis", "STREAMS_KINESIS_PREFIX": settings.kinesis_prefix,
           "STREAMS_KINESIS_LEASE_TABLE": settings.kinesis_lease_table,
           "STREAMS_KINESIS_FAILOVER_MS": "3000", "STREAMS_KINESIS_SHARDS": "2"}
    replayed = run_cli("replay", "--from", f"sequence:{sequence}", "-q",
                       data_dir=settings.data_dir, env=env)
    assert "epoch 1" in replayed.stdout
    _check_outputs(settings, env, expected)

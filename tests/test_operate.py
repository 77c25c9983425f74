"""The operator's side against running workers (real processes on the embedded log):
every metric family scraped and parsed with prometheus_client's parser, /healthz and
/readyz, JSON log lines, webhook alerts (once per batch and cause across a restart, through
a webhook that fails first), and `streams status --watch` exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kafka_broker import cli_env, fresh_kafka_bootstrap
from tests.ops_support import (
    RecordingWebhook,
    http_status,
    samples,
    scrape,
    total,
    wait_for,
)
from tests.ports import free_port
from tests.support import random_rows, run_cli, write_csv

__all__ = ["fresh_kafka_bootstrap"]  # the fixture, requested by name by the Kafka test
SECRET = "Sup3rSecretPw"


class Worker:
    """`streams worker` as a process, its stderr in a file."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.log_path = data_dir.parent / f"worker-{len(list(data_dir.parent.iterdir()))}.log"
        self._err = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", *args],
            env={**os.environ, "STREAMS_DATA_DIR": str(data_dir), **(env or {})},
            stdout=subprocess.DEVNULL, stderr=self._err, cwd=data_dir.parent)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._err.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def webhook() -> Iterator[RecordingWebhook]:
    hook = RecordingWebhook(fail_first=2)
    yield hook
    hook.close()


def _input(tmp_path: Path, rows: int = 2000, bad: int = 5, seed: int = 1) -> Path:
    path = write_csv(tmp_path / f"in-{seed}.csv", random_rows(rows, 500, 3, seed))
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(",seg-0,add\n" for _ in range(bad))  # blank user ids: dead letters
    return path


def _batches(families: dict[str, Any], status: str) -> float:
    return total(families, "streams_batches", status=status)


def test_every_metric_family_from_a_running_worker(tmp_path: Path, data_dir: Path) -> None:
    port = free_port()
    worker = Worker(data_dir, "--metrics-port", str(port), "--member", "w1", "-v",
                    "--log-format", "json", "--warehouse-threads", "1")
    try:
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, 60, "healthz")
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 60, "readyz")
        assert http_status(f"http://127.0.0.1:{port}/nothing") == 404
        run_cli("import", str(_input(tmp_path)), "--segment", "seg-0", "-q",
                data_dir=data_dir)
        status = json.loads(run_cli("status", "--json", data_dir=data_dir).stdout)[0]
        batch = status["batch_id"]
        wait_for(lambda: _batches(scrape(port), "closed") == 1, 120, "the batch closed")
        status = json.loads(run_cli("status", batch, "--json", data_dir=data_dir).stdout)[0]
        # A pass after the close has also read lag and dead letters: wait until the sinks'
        # groups show no lag (the monitor reads them every 2 s).
        wait_for(lambda: total(scrape(port), "streams_consumer_lag_messages") == 0, 60,
                 "no lag")
        m = scrape(port, up=True)
    finally:
        assert worker.stop() == 0
    counts = status["partition_counts"]
    # Records: each partition's rows plus its end marker, through the segments processor.
    for p, rows in enumerate(counts):
        assert total(m, "streams_records_processed_total", task="segments",
                     topic="audience.rows", partition=str(p)) == rows + 1
        assert total(m, "streams_messages_processed_total", task="segments",
                     topic="audience.rows", partition=str(p)) >= 2
    changes = sum(status["applied"].values())
    for sink in ("s3", "warehouse"):
        assert total(m, "streams_records_processed_total", task=f"sink-{sink}",
                     topic="audience.segment-changes") == changes + len(counts)
        assert total(m, "streams_sink_rows_total", sink=sink) == changes
        assert total(m, "streams_sink_load_duration_seconds_count", sink=sink) >= len(counts)
        assert total(m, "streams_sink_load_duration_seconds_sum", sink=sink) > 0
    assert total(m, "streams_messages_processed_total", task="pipeline",
                 topic="pipeline.events") >= 1 + len(counts) * 3  # submitted..committed
    assert total(m, "streams_checkpoint_duration_seconds_count", task="segments") >= 1
    assert total(m, "streams_checkpoint_duration_seconds_count", task="pipeline") >= 1
    # Restores: one per partition of each processor, and the keys they found (none: new).
    assert total(m, "streams_state_restore_duration_seconds_count", task="segments") == 4
    assert total(m, "streams_state_restore_duration_seconds_count", task="pipeline") == 2
    assert len(samples(m, "streams_state_restored_keys", task="segments")) == 4
    # Lag per group and partition, in messages and seconds.
    lag = samples(m, "streams_consumer_lag_messages")
    assert {s.labels["group"] for s in lag} >= {"processor-segments", "processor-pipeline",
                                                "sink-s3", "sink-warehouse"}
    assert {s.labels["partition"] for s in lag if s.labels["group"] == "sink-s3"} == {
        "0", "1", "2", "3"}
    assert samples(m, "streams_consumer_lag_seconds", group="sink-s3")
    # The batch table, the dead letters, the oldest open batch.
    assert _batches(m, "closed") == 1 and _batches(m, "failed") == 0
    assert total(m, "streams_rejected_rows") == 5
    assert total(m, "streams_dead_letters") == 5
    assert total(m, "streams_oldest_open_batch_age_seconds") == 0
    assert total(m, "streams_monitor_passes_total") >= 1
    # Every family named by the conventions: counters end in _total, times in _seconds.
    for family in m.values():
        if family.name.startswith("streams_"):
            assert family.type != "counter" or all(s.name.endswith("_total")
                                                   for s in family.samples)
            assert "duration" not in family.name or family.name.endswith("_seconds")
    # The JSON log: one object per line, restores carry task, partition and member.
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    restored = [x for x in lines if x["message"].startswith("segments: restored")]
    assert {x["partition"] for x in restored} == {0, 1, 2, 3}
    assert all(x["task"] == "segments" and x["member"] == "w1" for x in restored)
    assert any(x.get("batch_id") == batch and "closed" in x["message"] for x in lines)


def test_open_batch_age_readiness_and_a_deadline_alert(tmp_path: Path, data_dir: Path,
                                                        webhook: RecordingWebhook) -> None:
    """Processors without sinks: the batch stays open, its age grows past the deadline, and
    one alert reaches the webhook (after two failed attempts); no secret in the log."""
    port = free_port()
    worker = Worker(data_dir, "--roles", "segments,pipeline", "--metrics-port", str(port),
                    "--alert-webhook", webhook.url, "--batch-deadline", "1s", "-v",
                    "--log-format", "json",
                    "--warehouse", f"postgresql://app:{SECRET}@127.0.0.1:1/none")
    try:
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 60, "readyz")
        run_cli("import", str(_input(tmp_path, 200, 0)), "--segment", "s", "-q",
                data_dir=data_dir)
        wait_for(lambda: _batches(scrape(port), "published") == 1, 60, "published")
        wait_for(lambda: total(scrape(port), "streams_oldest_open_batch_age_seconds") > 1, 60,
                 "the open batch older than 1 s")
        wait_for(lambda: webhook.accepted, 60, "the deadline alert")
        wait_for(lambda: total(scrape(port), "streams_alerts_sent_total",
                               cause="deadline") == 1, 30, "the alert counted")
        m = scrape(port, up=True)
    finally:
        assert worker.stop() == 0
    assert len(webhook.attempts) == 3 and len(webhook.accepted) == 1
    alert = webhook.accepted[0]
    assert alert["cause"] == "deadline" and "still published" in alert["text"]
    assert "waiting for:" in alert["text"] and "s3 on partitions" in alert["text"]
    assert total(m, "streams_alert_attempts_failed_total") == 2
    log = worker.log()
    assert SECRET not in log and "XYZsecret" not in log
    assert "retrying" in log


def test_a_failed_batch_is_alerted_once_across_restarts(tmp_path: Path, data_dir: Path,
                                                        webhook: RecordingWebhook) -> None:
    over_budget = _input(tmp_path, 100, 20)  # 20 of 120 rejected: over the 1% budget
    port = free_port()
    args = ("--metrics-port", str(port), "--alert-webhook", webhook.url)
    worker = Worker(data_dir, *args)
    try:
        run_cli("import", str(over_budget), "--segment", "s", "-q", data_dir=data_dir,
                check=False)
        wait_for(lambda: webhook.accepted, 60, "the failure alert")
    finally:
        assert worker.stop() == 0
    assert [a["cause"] for a in webhook.accepted] == ["error_budget"]
    assert "over the error budget" in webhook.accepted[0]["text"]
    assert "streams dead-letters" in webhook.accepted[0]["text"]
    # Restarted: the monitor reads the failed batch again, and sends nothing.
    again = Worker(data_dir, *args)
    try:
        wait_for(lambda: total(scrape(port), "streams_monitor_passes_total") >= 2, 60,
                 "two passes of the restarted monitor")
        assert _batches(scrape(port), "failed") == 1
    finally:
        assert again.stop() == 0
    assert len(webhook.accepted) == 1 and len(webhook.attempts) == 3
    # `streams run` alerts too (its parent monitors; its sinks child sends none).
    proc = run_cli("run", str(_input(tmp_path, 100, 30, seed=2)), "--segment", "s", "-q",
                   "--alert-webhook", webhook.url, data_dir=data_dir, check=False)
    assert proc.returncode == 1
    assert [a["cause"] for a in webhook.accepted] == ["error_budget", "error_budget"]


def test_status_watch_exit_codes(tmp_path: Path, data_dir: Path) -> None:
    closed = run_cli("run", str(_input(tmp_path, 100, 0)), "--segment", "s", "-q",
                     "--metrics-port", str(free_port()), data_dir=data_dir)  # P and P+1
    assert "closed" in closed.stdout
    failed = run_cli("run", str(_input(tmp_path, 100, 30, seed=3)), "--segment", "s", "-q",
                     data_dir=data_dir, check=False)
    assert failed.returncode == 1
    statuses = json.loads(run_cli("status", "--json", data_dir=data_dir).stdout)
    by = {s["status"]: s["batch_id"] for s in statuses}
    assert run_cli("status", by["closed"], "--watch", data_dir=data_dir).returncode == 0
    assert run_cli("status", by["failed"], "--watch", data_dir=data_dir,
                   check=False).returncode == 1
    missing = run_cli("status", "nope", "--watch", data_dir=data_dir, check=False)
    assert missing.returncode == 2 and "no batch nope" in missing.stderr
    # An open batch: the watch waits, and ends 0 once a worker closes it.
    run_cli("import", str(_input(tmp_path, 100, 0, seed=4)), "--segment", "s", "-q",
            data_dir=data_dir)
    statuses = json.loads(run_cli("status", "--json", data_dir=data_dir).stdout)
    open_id = next(s["batch_id"] for s in statuses if s["status"] == "published")
    timed_out = run_cli("status", open_id, "--watch", "--timeout", "0.5", "--interval",
                        "0.1", data_dir=data_dir, check=False)
    assert timed_out.returncode == 1 and "still published" in timed_out.stderr
    watch = subprocess.Popen([sys.executable, "-m", "streams", "status", open_id, "--watch",
                              "--interval", "0.2"], env={**os.environ,
                             "STREAMS_DATA_DIR": str(data_dir)}, stdout=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    worker = Worker(data_dir)
    try:
        out, _ = watch.communicate(timeout=120)
    finally:
        worker.stop()
    assert watch.returncode == 0
    assert "published" in out and out.rstrip().splitlines()[-1].split()[1] == "closed"


@pytest.mark.parametrize("args, message", [
    (("--batch-deadline", "soon"), "--batch-deadline 'soon': expected a duration"),
    (("--alert-webhook", "ftp://x"), "--alert-webhook: expected an http:// or https:// URL"),
    (("--log-format", "xml"), "'xml' is not one of 'human', 'json'"),
])
def test_operator_settings_are_checked(data_dir: Path, args: tuple[str, ...],
                                       message: str) -> None:
    proc = run_cli("worker", *args, data_dir=data_dir, check=False, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_metrics_port_in_use_is_a_usage_error(data_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("worker", "--metrics-port", str(port), data_dir=data_dir, check=False,
                       timeout=60)
    assert proc.returncode == 2
    assert f"--metrics-port {port}: Address already in use" in proc.stderr


def test_run_with_json_logs_writes_only_json_lines(tmp_path: Path, data_dir: Path) -> None:
    proc = run_cli("--log-format", "json", "-v", "run", str(_input(tmp_path, 300, 2)),
                   "--segment", "s", "--warehouse", str(data_dir / "wh.duckdb"),
                   "--alert-webhook", "https://hooks.example.com/services/T1/B2/tok3n",
                   data_dir=data_dir)
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    batch = json.loads(run_cli("status", "--json", data_dir=data_dir).stdout)[0]["batch_id"]
    assert any(x.get("batch_id") == batch and x["message"] == f"batch {batch}: closed"
               for x in lines)
    assert {x["task"] for x in lines if "task" in x} >= {"segments", "pipeline"}
    assert all(x["member"].startswith("run-") for x in lines if "member" in x)
    assert "tok3n" not in proc.stderr


def test_metrics_on_kafka(tmp_path: Path, data_dir: Path, request: pytest.FixtureRequest
                          ) -> None:
    """The same families from a worker on a Kafka broker (Tansu): the monitor reads the
    batch table and the groups' positions through a Kafka client of its own."""
    env = cli_env(request.getfixturevalue("fresh_kafka_bootstrap"))
    port = free_port()
    worker = Worker(data_dir, "--metrics-port", str(port), env=env)
    try:
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 120, "readyz")
        run_cli("import", str(_input(tmp_path, 500, 2)), "--segment", "s", "-q",
                data_dir=data_dir, env=env)
        wait_for(lambda: _batches(scrape(port), "closed") == 1, 180, "the batch closed")
        wait_for(lambda: total(scrape(port), "streams_dead_letters") == 2, 60, "dead letters")
        wanted = {"processor-segments", "sink-s3", "sink-warehouse"}
        wait_for(lambda: wanted <= {s.labels["group"] for s in samples(
            scrape(port), "streams_consumer_lag_messages")}, 60, "every group's lag")
        m = scrape(port, up=True)
    finally:
        assert worker.stop() == 0
    assert total(m, "streams_records_processed_total", task="segments") == 500 + 4
    assert total(m, "streams_rejected_rows") == 2

"""The operator side's pure parts and the webhook: redaction, log formats, alert decisions,
the outbox across restarts, retries with backoff against a local server that fails first."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.pipeline_state import BatchStatus
from streams import alerts, logs
from streams.batch_view import freshness
from streams.monitor import batch_gauges
from tests.ops_support import RecordingWebhook, wait_for

SECRET_CHARS = st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                     blacklist_characters="@/:%"), min_size=4, max_size=30)


# -- redaction ---------------------------------------------------------------------------
@given(SECRET_CHARS, st.sampled_from(["postgresql", "redshift", "https", "kafka", "mysql"]))
@settings(max_examples=200, deadline=None)
def test_a_password_in_a_connection_url_never_survives(password: str, scheme: str) -> None:
    line = f"could not connect to {scheme}://admin:{password}@db.internal:5432/warehouse now"
    out = logs.redact(line)
    assert password not in out
    assert f"{scheme}://admin:***@db.internal:5432/warehouse" in out


@pytest.mark.parametrize("line, secret", [
    ("key AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE"),
    ("temporary ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ('{"password": "hunter2hunter2"}', "hunter2hunter2"),
    ("dsn host=db user=app password=s3cr3t! dbname=x", "s3cr3t!"),
    ("Authorization: Bearer abcdefghijklmnop.qrs", "abcdefghijklmnop.qrs"),
    ("posting to https://hooks.slack.com/services/T0/B0/XXXXsecretXXXX", "XXXXsecretXXXX"),
    ("AWS_SESSION_TOKEN: FwoGZXIvYXdzEJr//////////", "FwoGZXIvYXdzEJr"),
])
def test_aws_keys_tokens_and_webhook_paths_are_redacted(line: str, secret: str) -> None:
    assert secret not in logs.redact(line)


def test_redaction_keeps_what_is_no_secret() -> None:
    line = "segments: restored audience.rows[3] (applied up to 812) in 0.02s; s3://bucket/key"
    assert logs.redact(line) == line


def _log_through(fmt: str, *args: object, **extra: object) -> str:
    stream = io.StringIO()
    logs.configure(1, fmt, stream)
    try:
        logs.bind(member="worker-7")
        logging.getLogger("streams.test").info(*args, extra=extra)  # type: ignore[arg-type]
        try:
            raise RuntimeError("connect postgresql://u:topsecret@h/db failed")
        except RuntimeError:
            logging.getLogger("streams.test").exception("boom")
    finally:
        logs.bind(member=None)
        logs._bound.set({})
        logs.configure(0, "human")
    return stream.getvalue()


def test_json_lines_carry_the_fields_and_no_secret() -> None:
    out = _log_through("json", "loading %s", "postgresql://app:pw123456@db/x",
                       batch_id="b-1", partition=3, task="sink-warehouse")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["level"] == "info" and first["logger"] == "streams.test"
    assert (first["batch_id"], first["partition"], first["task"], first["member"]) == (
        "b-1", 3, "sink-warehouse", "worker-7")
    assert first["time"].endswith("Z")
    assert "pw123456" not in out and "topsecret" not in out
    assert "RuntimeError" in lines[1]["exception"]


def test_human_lines_carry_the_fields_and_no_secret() -> None:
    out = _log_through("human", "loading %s", "redshift://a:pw123456@c/d", batch_id="b-2")
    assert "batch_id=b-2" in out and "member=worker-7" in out
    assert "pw123456" not in out and "topsecret" not in out


# -- alert decisions ---------------------------------------------------------------------
def _status(batch: str, status: str, submitted: int = 0, **kw: object) -> BatchStatus:
    return BatchStatus(batch_id=batch, status=status, submitted_at=submitted, source="f.csv",
                       **kw)  # type: ignore[arg-type]


def test_alert_causes() -> None:
    now = 100_000
    batches = [
        _status("closed", "closed", closed_at=50_000),
        _status("budget", "failed", failed_step="import",
                error="f.csv: 9 of 10 rows rejected, over the error budget of 1%"),
        _status("count", "failed", failed_step="segments", error="count mismatch"),
        _status("late", "published", submitted=now - 61_000, partitions=2, sinks=("s3",)),
        _status("young", "published", submitted=now - 10_000),
    ]
    due = alerts.due(batches, now, 60.0, set())
    assert {(a.batch_id, a.cause) for a in due} == {
        ("budget", "error_budget"), ("count", "failed"), ("late", "deadline")}
    late = next(a for a in due if a.cause == "deadline")
    assert "61s" in late.text and "streams status late" in late.text
    budget = next(a for a in due if a.cause == "error_budget")
    assert "error budget" in budget.text and "streams dead-letters" not in budget.text
    assert alerts.due(batches, now, None, set()) == [a for a in due if a.cause != "deadline"]


def test_old_failures_are_history() -> None:
    day = 24 * 3600 * 1000
    now = 10 * day
    batches = [_status("old", "failed", failed_at=now - 2 * day, failed_step="segments",
                       error="x"),
               _status("new", "failed", failed_at=now - 1000, failed_step="segments",
                       error="x")]
    assert [a.batch_id for a in alerts.due(batches, now, None, set())] == ["new"]


@given(st.lists(st.tuples(st.sampled_from("abcde"),
                          st.sampled_from(["submitted", "published", "closed", "failed"]),
                          st.integers(0, 200_000)), max_size=30),
       st.lists(st.integers(0, 400_000), min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_each_alert_once_per_batch_and_cause(events: list[tuple[str, str, int]],
                                             clock: list[int]) -> None:
    """Over any sequence of passes, with any statuses, a (batch, cause) is due once."""
    known: set[str] = set()
    sent: list[str] = []
    for now in sorted(clock):
        batches = [_status(b, s, submitted=t) for b, s, t in events]
        for alert in alerts.due(batches, now, 30.0, known):
            assert alert.key not in known
            known.add(alert.key)
            sent.append(alert.key)
    assert len(sent) == len(set(sent))


def test_durations() -> None:
    assert [alerts.parse_duration(t) for t in ("90", "90s", "15m", "2h", "1d", "500ms")] == [
        90, 90, 900, 7200, 86400, 0.5]
    with pytest.raises(ValueError, match="--batch-deadline"):
        alerts.parse_duration("soon")


def test_batch_gauges_and_freshness() -> None:
    batches = [_status("a", "closed", submitted=1_000, closed_at=5_000, rejected=2,
                       segments=("vip", "x")),
               _status("b", "closed", submitted=2_000, closed_at=9_000, segments=("vip",)),
               _status("c", "published", submitted=3_000, rejected=1),
               _status("d", "failed", submitted=500)]
    by_status, rejected, oldest = batch_gauges(batches, 13_000)
    assert by_status == {"closed": 2, "published": 1, "failed": 1}
    assert rejected == 3 and oldest == 10.0
    assert [(r["segment"], r["batch_id"]) for r in freshness(batches)] == [
        ("vip", "b"), ("x", "a")]


# -- the webhook and its outbox ----------------------------------------------------------
def test_retries_with_backoff_until_the_webhook_accepts(tmp_path: Path) -> None:
    hook = RecordingWebhook(fail_first=3)
    outbox = alerts.Outbox(tmp_path / "outbox.jsonl")
    sender = alerts.Webhook(hook.url, outbox, first_backoff_s=0.05)
    try:
        sender.notify([alerts.Alert("b-1", "failed", "batch b-1 failed")])
        wait_for(lambda: hook.accepted, 30, "the alert accepted")
        wait_for(sender.idle, 10, "the sender idle")
        assert len(hook.attempts) == 4
        assert hook.accepted == [{"text": "batch b-1 failed", "batch_id": "b-1",
                                  "cause": "failed"}]
        sender.notify([alerts.Alert("b-1", "failed", "again")])  # known: not queued again
        assert sender.idle() and len(hook.attempts) == 4
    finally:
        sender.close()
        hook.close()
    assert outbox.pending() == [] and outbox.known() == {"b-1/failed"}


def test_notify_never_waits_for_the_webhook(tmp_path: Path) -> None:
    hook = RecordingWebhook(hold=True)
    sender = alerts.Webhook(hook.url, alerts.Outbox(tmp_path / "outbox.jsonl"))
    try:
        started = time.monotonic()
        sender.notify([alerts.Alert(f"b-{i}", "failed", "x") for i in range(5)])
        returned = time.monotonic() - started
        wait_for(lambda: hook.attempts, 10, "the first attempt to arrive")
        assert not hook.accepted  # the webhook still holds it, and notify has returned
        assert returned < 5.0
        hook.release()
        wait_for(lambda: len(hook.accepted) == 5, 30, "all five accepted")
    finally:
        sender.close()
        hook.close()


def test_queued_alerts_survive_a_restart_and_are_sent_once(tmp_path: Path) -> None:
    path = tmp_path / "alerts" / "outbox.jsonl"
    down = RecordingWebhook(fail_first=10**6)  # down for the first process
    first = alerts.Webhook(down.url, alerts.Outbox(path), first_backoff_s=0.05)
    first.notify([alerts.Alert("b-9", "deadline", "late")])
    wait_for(lambda: len(down.attempts) >= 2, 10, "retries against the failing webhook")
    first.close()  # stopped before any success: the alert stays queued
    down.close()
    assert [a.key for a in alerts.Outbox(path).pending()] == ["b-9/deadline"]

    up = RecordingWebhook()
    second = alerts.Webhook(up.url, alerts.Outbox(path), first_backoff_s=0.05)
    try:
        wait_for(lambda: up.accepted, 10, "the queued alert sent by the next process")
        wait_for(second.idle, 10)
        second.notify([alerts.Alert("b-9", "deadline", "late")])
        assert second.idle()
    finally:
        second.close()
    third = alerts.Webhook(up.url, alerts.Outbox(path))
    try:
        assert third.idle() and alerts.Outbox(path).pending() == []
    finally:
        third.close()
        up.close()
    assert [b["batch_id"] for b in up.accepted] == ["b-9"]


# -- readiness ---------------------------------------------------------------------------
def test_readyz_waits_for_the_first_round_and_for_every_restore(tmp_path: Path) -> None:
    """/readyz: 503 before the worker's first round of steps (tasks joining, restoring) and
    while any partition is restored (a rebalance later), 200 otherwise; /healthz always."""
    from types import SimpleNamespace

    from streams import metrics
    from streams.operations import Operations
    from streams.settings import Settings
    from tests.ops_support import http_status

    worker = SimpleNamespace(rounds=0)
    ops = Operations(Settings(data_dir=tmp_path, metrics_port=0), worker, lambda: None,
                     monitor=False)
    try:
        assert ops.server is not None
        base = f"http://127.0.0.1:{ops.server.port}"
        assert http_status(f"{base}/healthz") == 200
        assert http_status(f"{base}/readyz") == 503
        worker.rounds = 1
        assert http_status(f"{base}/readyz") == 200
        with metrics.restoring():
            assert http_status(f"{base}/readyz") == 503
        assert http_status(f"{base}/readyz") == 200
    finally:
        ops.close()


def test_watch_redraws_in_place_on_a_terminal() -> None:
    from streams.status_watch import _draw

    out = io.StringIO()
    _draw(["HEADER", "b-1 published"], 0, out)
    _draw(["HEADER", "b-1 closed"], 2, out)
    assert out.getvalue() == "HEADER\nb-1 published\n\x1b[2F\x1b[JHEADER\nb-1 closed\n"


def test_a_failing_read_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from streams.monitor import Monitor

    calls = []

    def broker_down() -> None:
        calls.append(1)
        raise ConnectionError("broker down")

    with caplog.at_level(logging.WARNING, logger="streams.monitor"):
        monitor = Monitor(broker_down, interval_s=0.01)
        wait_for(lambda: len(calls) >= 5, 10, "five failed passes")
        monitor.close()
    failed = [r for r in caplog.records if "reading the state failed" in r.getMessage()]
    assert len(failed) == 1 and "ConnectionError: broker down" in failed[0].getMessage()

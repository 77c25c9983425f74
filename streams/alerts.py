"""Alerts to a webhook (`--alert-webhook URL`, Slack-compatible `{"text": ...}` bodies):
a batch failed, a batch failed over its error budget, an open batch past `--batch-deadline`.

Each alert goes once per (batch, cause), across restarts: the outbox is a small append-only
file, DATA_DIR/alerts/outbox.jsonl, with a `queued` line (the whole message) before the
first attempt and a `sent` line once the webhook accepted it. A process that starts finds
what was queued and never sent and sends it; what was sent is never queued again. (A crash
between the webhook's answer and the `sent` line sends that one alert twice: at least once,
as any webhook delivery.) Lines are appended under an flock, so workers of one data dir
share one outbox.

Delivery is a daemon thread with exponential backoff (and jitter), so processing never
waits for the webhook; `notify` only appends to the file and a queue.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streams import metrics
from streams.logs import redact

if TYPE_CHECKING:  # the type only: streams/ does not depend on processors/
    from processors.pipeline_state import BatchStatus

log_ = logging.getLogger(__name__)

FAILED, BUDGET, DEADLINE = "failed", "error_budget", "deadline"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '2h', '1d', '500ms'; ValueError otherwise."""
    match = _DURATION.match(text or "")
    if not match:
        raise ValueError(f"--batch-deadline {text!r}: expected a duration such as 90s, 15m, "
                         "2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Alert:
    batch_id: str
    cause: str  # failed | error_budget | deadline
    text: str  # the Slack message

    @property
    def key(self) -> str:
        return f"{self.batch_id}/{self.cause}"


def _over_budget(status: BatchStatus) -> bool:
    return status.failed_step == "import" and "error budget" in status.error


# A failure older than this is history, not news: turning alerts on for a data dir with old
# failed batches does not page anyone for each of them.
MAX_AGE_S = 24 * 3600.0


def due(batches: Iterable[BatchStatus], now_ms: int, deadline_s: float | None,
        known: set[str], max_age_s: float = MAX_AGE_S) -> list[Alert]:
    """The alerts these statuses call for that are not in `known` (keys already queued).
    Pure: the monitor calls it on every pass."""
    out = []
    for s in batches:
        if s.status == "failed" and (s.failed_at or now_ms) < now_ms - max_age_s * 1000:
            continue
        if s.status == "failed":
            cause = BUDGET if _over_budget(s) else FAILED
        elif (deadline_s is not None and not s.finished and s.submitted_at is not None
              and now_ms - s.submitted_at > deadline_s * 1000):
            cause = DEADLINE
        else:
            continue
        alert = Alert(s.batch_id, cause, message(s, cause, now_ms, deadline_s))
        if alert.key not in known:
            out.append(alert)
            known = {*known, alert.key}
    return out


def message(s: BatchStatus, cause: str, now_ms: int, deadline_s: float | None) -> str:
    """The alert's text: what happened, the batch, the step, the error, where to look."""
    if cause == DEADLINE:
        head = (f":warning: batch `{s.batch_id}` is still {s.status} after "
                f"{(now_ms - (s.submitted_at or now_ms)) / 1000:.0f}s "
                f"(deadline {deadline_s or 0:.0f}s)")
    elif cause == BUDGET:
        head = f":red_circle: batch `{s.batch_id}` failed: over its error budget"
    else:
        head = f":red_circle: batch `{s.batch_id}` failed"
    lines = [head, f"source: {s.source}", f"rows: {s.rows:,} ({s.rejected:,} rejected)"]
    if s.failed_step or s.error:
        lines.append(f"step: {s.failed_step or '-'}; error: {s.error}")
    if cause == DEADLINE:
        waiting = _waiting_for(s)
        if waiting:
            lines.append(f"waiting for: {waiting}")
    look = f"streams status {s.batch_id}"
    if s.rejected:
        look += f"; streams dead-letters {s.batch_id}"
    lines.append(f"look: {look}")
    return redact("\n".join(lines))


def _waiting_for(s: BatchStatus) -> str:
    if s.published_at is None:
        return "the import (published event)"
    missing = [str(p) for p in range(s.partitions) if str(p) not in s.applied]
    if missing:
        return f"segments processor on partitions {', '.join(missing)}"
    behind = [f"{sink} on partitions {', '.join(map(str, sorted(set(range(s.partitions)) - set(s.committed.get(sink, [])))))}"  # noqa: E501
              for sink in s.sinks if set(s.committed.get(sink, [])) != set(range(s.partitions))]
    return "; ".join(behind)


class Outbox:
    """The durable record of alerts: queued (with their text) and sent."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                yield f
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _read(f: Any) -> tuple[dict[str, Alert], set[str]]:
        queued: dict[str, Alert] = {}
        sent: set[str] = set()
        for line in f.read().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash: its alert is queued again
            if entry.get("state") == "queued":
                alert = Alert(entry["batch_id"], entry["cause"], entry["text"])
                queued[alert.key] = alert
            elif entry.get("state") == "sent":
                sent.add(entry["key"])
        return queued, sent

    @staticmethod
    def _append(f: Any, entry: dict[str, Any]) -> None:
        f.seek(0, os.SEEK_END)
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def known(self) -> set[str]:
        with self._locked() as f:
            queued, sent = self._read(f)
        return set(queued) | sent

    def pending(self) -> list[Alert]:
        with self._locked() as f:
            queued, sent = self._read(f)
        return [a for k, a in queued.items() if k not in sent]

    def queue(self, alerts: list[Alert]) -> list[Alert]:
        """Records these alerts as queued; returns those no other process queued first."""
        with self._locked() as f:
            queued, sent = self._read(f)
            fresh = [a for a in alerts if a.key not in queued and a.key not in sent]
            for a in fresh:
                self._append(f, {"state": "queued", "key": a.key, "batch_id": a.batch_id,
                                 "cause": a.cause, "text": a.text, "at": time.time()})
        return fresh

    def mark_sent(self, alert: Alert) -> None:
        with self._locked() as f:
            self._append(f, {"state": "sent", "key": alert.key, "at": time.time()})


class Webhook:
    """Posts alerts on a daemon thread, retrying each with exponential backoff until the
    webhook answers 2xx (or `close`). Alerts go in order; one that keeps failing holds the
    next ones back (the webhook is down for all of them alike)."""

    def __init__(self, url: str, outbox: Outbox, first_backoff_s: float = 0.5,
                 max_backoff_s: float = 60.0, timeout_s: float = 10.0):
        self.url = url
        self.outbox = outbox
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._queue: queue.Queue[Alert] = queue.Queue()
        self._stop = threading.Event()
        for alert in outbox.pending():  # queued by an earlier process, never sent
            self._queue.put(alert)
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def notify(self, alerts: list[Alert]) -> None:
        """Queues these alerts (once each, across processes and restarts); never waits for
        the webhook."""
        for alert in self.outbox.queue(alerts):
            log_.warning("alert: %s", alert.text.splitlines()[0],
                         extra={"batch_id": alert.batch_id, "cause": alert.cause})
            self._queue.put(alert)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alert = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._deliver(alert)
            finally:
                self._queue.task_done()

    def _deliver(self, alert: Alert) -> None:
        backoff = self.first_backoff_s
        while not self._stop.is_set():
            error = self._post(alert)
            if error is None:
                self.outbox.mark_sent(alert)
                metrics.on_alert_sent(alert.cause)
                return
            metrics.on_alert_failed()
            log_.warning("alert webhook %s: %s; retrying in %.1fs", redact(self.url),
                         redact(error), backoff,
                         extra={"batch_id": alert.batch_id, "cause": alert.cause})
            self._stop.wait(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.max_backoff_s)

    def _post(self, alert: Alert) -> str | None:
        body = json.dumps({"text": alert.text, "batch_id": alert.batch_id,
                           "cause": alert.cause}).encode()
        request = urllib.request.Request(self.url, body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                answer.read()
            return None
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

"""The monitor: a daemon thread that, every few seconds, reads the batch table, the consumer
groups' positions and the dead-letter topic through a log handle of its own, sets the gauges
of streams/metrics.py from them and queues the alerts they call for (streams/alerts.py).
It reads only, and never in the worker's loop: a slow read delays a gauge, not a message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streams import alerts, metrics
from topics.spec import DEAD_LETTER

if TYPE_CHECKING:
    from processors.pipeline_state import BatchStatus

log_ = logging.getLogger(__name__)


def batch_gauges(batches: list[BatchStatus], now_ms: int) -> tuple[dict[str, int], int, float]:
    """(batches by status, rejected rows, age in seconds of the oldest open batch)."""
    by_status = Counter(s.status for s in batches)
    rejected = sum(s.rejected for s in batches)
    opened = [s.submitted_at for s in batches if not s.finished and s.submitted_at]
    oldest = max(0.0, (now_ms - min(opened)) / 1000) if opened else 0.0
    return dict(by_status), rejected, oldest


class Monitor:
    def __init__(self, open_pipeline: Callable[[], Any], interval_s: float = 2.0,
                 webhook: alerts.Webhook | None = None, deadline_s: float | None = None,
                 groups: tuple[str, ...] = ()):
        """`groups`: the pipeline's consumer groups, read besides those the log lists (a
        broker may list none: Tansu)."""
        self._open = open_pipeline
        self.groups = groups
        self.interval_s = interval_s
        self.webhook = webhook
        self.deadline_s = deadline_s
        self._known = webhook.outbox.known() if webhook is not None else set()
        self._pipe: Any = None
        self._seen: dict[str, str] | None = None  # batch -> status at the last pass
        self._lock = threading.Lock()  # one pass at a time (the thread's, or close's last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = ""  # the last failure, logged once until it changes or passes
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # a read that failed: the next pass tries again
                text = f"{type(exc).__name__}: {exc}"
                if text != failing:
                    log_.warning("monitor: reading the state failed: %s (retrying every "
                                 "%.0fs)", text, self.interval_s)
                failing = text
            else:
                if failing:
                    log_.warning("monitor: reading the state works again")
                failing = ""
            self._stop.wait(self.interval_s)

    def check(self) -> None:
        """One pass: gauges, then alerts."""
        with self._lock:
            if self._pipe is None:
                self._pipe = self._open()
            pipe = self._pipe
            now_ms = int(time.time() * 1000)
            batches = list(pipe.batches().values())
            self._log_changes(batches)
            by_status, rejected, oldest = batch_gauges(batches, now_ms)
            dead = sum(info.messages for info in pipe.log.describe(DEAD_LETTER))
            metrics.set_batches(by_status, rejected, oldest, dead)
            groups = sorted({*pipe.log.groups(), *self.groups})
            positions = [gp for group in groups for gp in pipe.log.group_positions(group)]
            metrics.set_lag(positions, self._lag_ages(pipe.log, positions, now_ms))
            if self.webhook is not None:
                due = alerts.due(batches, now_ms, self.deadline_s, self._known)
                if due:
                    self.webhook.notify(due)
                    self._known |= {a.key for a in due}
            metrics.on_monitor_pass()

    def _log_changes(self, batches: list[BatchStatus]) -> None:
        """A line per batch whose status changed since the last pass (none on the first:
        those are history), carrying its batch id for log searches."""
        first = self._seen is None
        seen = self._seen or {}
        for s in batches:
            if not first and seen.get(s.batch_id) != s.status:
                level = logging.WARNING if s.status == "failed" else logging.INFO
                log_.log(level, "batch %s: %s%s", s.batch_id, s.status,
                         f" at {s.failed_step}: {s.error}" if s.error else "",
                         extra={"batch_id": s.batch_id})
            seen[s.batch_id] = s.status
        self._seen = seen

    @staticmethod
    def _lag_ages(log: Any, positions: list[Any], now_ms: int) -> dict[tuple[str, str, int],
                                                                        float]:
        """The age of the first message each group has not committed: the embedded log
        reads it from its files; on Kafka that would be a fetch per partition per pass, so
        there only the message count is shown."""
        if not str(getattr(log, "url", "")).startswith("embedded"):
            return {}
        ages = {}
        for gp in positions:
            if not gp.lag:
                continue
            first = next(iter(log.read(gp.tp.topic, gp.tp.partition, gp.committed)), None)
            if first is not None and first.timestamp_ms:
                ages[(gp.group, gp.tp.topic, gp.tp.partition)] = max(
                    0.0, (now_ms - first.timestamp_ms) / 1000)
        return ages

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.check()  # the last word: a batch that failed just now is alerted
        except Exception as exc:
            log_.warning("monitor: last pass failed: %s: %s", type(exc).__name__, exc)
        if self._pipe is not None:
            self._pipe.close()

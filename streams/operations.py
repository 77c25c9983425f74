"""The operator's side of a running worker, started beside its loop: the metrics endpoints
(`--metrics-port`), the monitor that feeds their gauges and the alerts
(`--alert-webhook`, `--batch-deadline`), and the member bound into every log line.
`streams worker` and `streams run` start it; nothing here runs inside the worker's loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from streams import logs, metrics
from streams.alerts import Outbox, Webhook, parse_duration
from streams.monitor import Monitor
from streams.settings import Settings

log_ = logging.getLogger(__name__)
MONITOR_INTERVAL_S = 2.0


class Operations:
    def __init__(self, settings: Settings, worker: Any, open_pipeline: Callable[[], Any],
                 member: str = "", monitor: bool = True):
        """`worker`: the streams.worker.Worker whose first round and restores say ready;
        `open_pipeline`: a fresh Pipeline for the monitor's own reads; `monitor`: False
        where another process of the same job monitors (the child of `streams run`)."""
        logs.bind(member=member)
        self.server: metrics.MetricsServer | None = None
        self.webhook: Webhook | None = None
        self.monitor: Monitor | None = None
        if settings.metrics_port is not None:
            ready = lambda: worker.rounds > 0 and not metrics.restores_running()  # noqa: E731
            self.server = metrics.MetricsServer(settings.metrics_port, ready)
            log_.info("metrics on :%d (/metrics, /healthz, /readyz)", self.server.port)
        if settings.alert_webhook and monitor:
            self.webhook = Webhook(settings.alert_webhook,
                                   Outbox(settings.data_dir / "alerts" / "outbox.jsonl"))
        # The monitor also runs for JSON logs: it logs each batch status change with its
        # batch_id, which is what a log search filters on.
        if monitor and (self.server is not None or self.webhook is not None or logs.is_json()):
            deadline = parse_duration(settings.batch_deadline) if settings.batch_deadline \
                else None
            from streams.pipeline import ROLES, group_names

            self.monitor = Monitor(open_pipeline, MONITOR_INTERVAL_S, self.webhook, deadline,
                                   tuple(group_names(ROLES)))

    def close(self, drain_s: float = 10.0) -> None:
        """Stops the monitor (after a last pass), gives the webhook up to `drain_s` for what
        is queued (what is left is sent by the next process that starts), then the server."""
        if self.monitor is not None:
            self.monitor.close()
        if self.webhook is not None:
            deadline = time.monotonic() + drain_s
            while not self.webhook.idle() and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the webhook thread's queue, bounded
            self.webhook.close()
        if self.server is not None:
            self.server.close()

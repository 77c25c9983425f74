"""Prometheus metrics of a worker, and its HTTP endpoints (`--metrics-port P`):
`/metrics` (the text exposition), `/healthz` (200 while the process serves) and `/readyz`
(200 once every assigned partition is restored, 503 before).

The metric objects live here and nowhere else; the tasks call the small `on_*` hooks below
(a few dictionary lookups each, per message, not per row), and the monitor
(streams/monitor.py) sets the gauges that come from the log and the batch table. Processors
never see any of it: they stay pure folds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DURATIONS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# (attribute, kind, name, help, labels): the metric families, made by `enable()`.
_FAMILIES: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    ("messages", "counter", "streams_messages_processed_total",
     "Messages a task processed, per input topic and partition.", ("task", "topic", "partition")),
    ("records", "counter", "streams_records_processed_total",
     "Records (rows, changes) in the messages a task processed.", ("task", "topic", "partition")),
    ("lag", "gauge", "streams_consumer_lag_messages",
     "Messages after the group's committed position.", ("group", "topic", "partition")),
    ("lag_seconds", "gauge", "streams_consumer_lag_seconds",
     "Age of the oldest message the group has not committed (where the log keeps message "
     "times).", ("group", "topic", "partition")),
    ("checkpoint", "histogram", "streams_checkpoint_duration_seconds",
     "A processor checkpoint: outputs, changelog, offsets.", ("task",)),
    ("restore", "histogram", "streams_state_restore_duration_seconds",
     "Restoring a partition's state (snapshot + changelog tail) and claiming it.", ("task",)),
    ("restore_keys", "gauge", "streams_state_restored_keys",
     "Keys in a partition's tables after its last restore.", ("task", "partition")),
    ("sink_load", "histogram", "streams_sink_load_duration_seconds",
     "A sink handling one message (staging, writing, merging at end markers).", ("sink",)),
    ("sink_rows", "counter", "streams_sink_rows_total", "Rows a sink was given to load.",
     ("sink",)),
    ("batches", "gauge", "streams_batches", "Batches in the batch table, by status.",
     ("status",)),
    ("rejected", "gauge", "streams_rejected_rows",
     "Rejected rows over every batch in the batch table (read from the table's fold, so a "
     "gauge).", ()),
    ("dead_letters", "gauge", "streams_dead_letters", "Messages on the dead-letter topic.", ()),
    ("oldest_open", "gauge", "streams_oldest_open_batch_age_seconds",
     "Seconds since the oldest batch that is neither closed nor failed was submitted (0: none "
     "open).", ()),
    ("alerts", "counter", "streams_alerts_sent_total", "Alerts the webhook accepted, by cause.",
     ("cause",)),
    ("alert_failures", "counter", "streams_alert_attempts_failed_total",
     "Webhook attempts that failed (each retried with backoff).", ()),
    ("monitor_passes", "counter", "streams_monitor_passes_total",
     "Reads of the batch table and the groups' positions by the monitor.", ()),
]
STATUSES = ("submitted", "published", "closed", "failed")


class _Metrics:
    """The metric objects. Made by `enable()` (--metrics-port): a process without it never
    imports prometheus-client (about 10 MB and 45 ms here), and its hooks are one check."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

        # No `_created` series beside each counter and histogram: they double the
        # exposition and no dashboard here reads them.
        disable_created_metrics()
        kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        for attr, kind, name, doc, labels in _FAMILIES:
            extra = {"buckets": _DURATIONS} if kind == "histogram" else {}
            setattr(self, attr, kinds[kind](name, doc, labels, **extra))
        self.children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def __getattr__(self, name: str) -> Any:  # the families, for the type checker
        raise AttributeError(name)


_m: _Metrics | None = None


def enable() -> None:
    """Makes the metric objects (once per process); before it, every hook does nothing."""
    global _m
    if _m is None:
        _m = _Metrics()


def enabled() -> bool:
    return _m is not None


# Messages that pack rows (topics/columns.py): `count` rows each. Every other message is one
# record (an end marker's `count` is what came before it, not its own size).
PACKED = ("AudienceRows", "SegmentChanges")


def _rows(schema: str, value: Any) -> int | None:
    if schema in PACKED and isinstance(value, dict) and isinstance(value.get("count"), int):
        return value["count"]
    return None


# -- hooks the tasks call ----------------------------------------------------------------
def on_message(task: str, topic: str, partition: int, schema: str, value: Any) -> None:
    if _m is None:
        return
    key = (task, topic, partition)
    pair = _m.children.get(key)
    if pair is None:  # labels() takes a lock and builds a key: once per partition
        labels = (task, topic, str(partition))
        pair = _m.children[key] = (_m.messages.labels(*labels), _m.records.labels(*labels))
    pair[0].inc()
    rows = _rows(schema, value)
    pair[1].inc(1 if rows is None else rows)


def on_restore(task: str, partition: int, seconds: float, keys: int) -> None:
    if _m is not None:
        _m.restore.labels(task).observe(seconds)
        _m.restore_keys.labels(task, str(partition)).set(keys)


_restores = 0  # partitions being restored now, in this process
_restores_lock = threading.Lock()


@contextmanager
def restoring() -> Iterator[None]:
    """Around a task's restores: /readyz answers 503 meanwhile."""
    global _restores
    with _restores_lock:
        _restores += 1
    try:
        yield
    finally:
        with _restores_lock:
            _restores -= 1


def restores_running() -> int:
    return _restores


def on_checkpoint(task: str, seconds: float) -> None:
    if _m is not None:
        _m.checkpoint.labels(task).observe(seconds)


def on_sink_load(sink: str, seconds: float, schema: str, value: Any) -> None:
    if _m is None:
        return
    _m.sink_load.labels(sink).observe(seconds)
    rows = _rows(schema, value)
    if rows is not None:
        _m.sink_rows.labels(sink).inc(rows)


def on_alert_sent(cause: str) -> None:
    if _m is not None:
        _m.alerts.labels(cause).inc()


def on_alert_failed() -> None:
    if _m is not None:
        _m.alert_failures.inc()


# -- what the monitor reads --------------------------------------------------------------
def set_lag(positions: Iterable[Any], ages_s: dict[tuple[str, str, int], float]) -> None:
    """`positions`: topics.log.GroupPosition; `ages_s`: (group, topic, partition) -> age of
    the oldest uncommitted message, where known."""
    if _m is None:
        return
    for gp in positions:
        labels = (gp.group, gp.tp.topic, str(gp.tp.partition))
        _m.lag.labels(*labels).set(gp.lag)
        age = ages_s.get((gp.group, gp.tp.topic, gp.tp.partition))
        if age is not None or not gp.lag:
            _m.lag_seconds.labels(*labels).set(age or 0.0)


def set_batches(by_status: dict[str, int], rejected: int, oldest_open_s: float,
                dead_letters: int) -> None:
    if _m is None:
        return
    for status in {*STATUSES, *by_status}:
        _m.batches.labels(status).set(by_status.get(status, 0))
    _m.rejected.set(rejected)
    _m.oldest_open.set(oldest_open_s)
    _m.dead_letters.set(dead_letters)


def on_monitor_pass() -> None:
    if _m is not None:
        _m.monitor_passes.inc()


# -- the endpoints -----------------------------------------------------------------------
class MetricsServer:
    """/metrics, /healthz, /readyz on HOST:PORT, served by a daemon thread (a scrape never
    waits for the worker's loop, nor the loop for a scrape)."""

    def __init__(self, port: int, ready: Callable[[], bool], host: str = "0.0.0.0"):
        enable()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    outer._answer(self, 200, generate_latest(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    outer._answer(self, 200, b"ok\n")
                elif path == "/readyz":
                    ok = outer.ready()
                    outer._answer(self, 200 if ok else 503,
                                  b"ready\n" if ok else b"restoring partitions\n")
                else:
                    outer._answer(self, 404, b"not found: /metrics, /healthz, /readyz\n")

            def log_message(self, *_args: Any) -> None:
                pass  # scrapes every few seconds would flood the log

        self.ready = lambda: bool(ready())
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                       daemon=True)
        self.thread.start()

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, code: int, body: bytes,
                kind: str = "text/plain; charset=utf-8") -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

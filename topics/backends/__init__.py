"""Backends chosen by URL, as Faust does: `embedded:///path`, `kafka://host:port`,
`kinesis://` (topics/backends/kinesis/log.py)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from topics.log import Log

# Options the kafka backend takes; others (e.g. the embedded log's `fsync`) do not apply.
KAFKA_OPTIONS = ("kafka_options", "session_timeout_ms", "heartbeat_interval_ms",
                 "max_poll_interval_ms", "replication_factor", "max_request_size",
                 "topic_wait_s")


def open_log(url: str, **options: object) -> Log:
    parsed = urlparse(url)
    if parsed.scheme in ("", "embedded", "file"):
        from topics.backends.embedded.log import EmbeddedLog

        path = parsed.path if parsed.scheme else url
        timeout_ms = options.get("embedded_session_timeout_ms", 10_000)
        return EmbeddedLog(Path(path), fsync=bool(options.get("fsync", False)),
                           session_timeout_s=int(timeout_ms) / 1000)  # type: ignore[call-overload]
    if parsed.scheme == "kafka":
        from topics.backends.kafka.log import KafkaLog

        bootstrap = url[len("kafka://"):].strip("/")
        kafka = {k: v for k, v in options.items() if k in KAFKA_OPTIONS}
        return KafkaLog(bootstrap, **kafka)  # type: ignore[arg-type]
    if parsed.scheme == "kinesis":
        from topics.backends.kinesis.log import KinesisLog

        kinesis = {k: v for k, v in options.items() if k.startswith("kinesis_")}
        return KinesisLog(url, **kinesis)
    raise ValueError(f"unknown backend URL {url!r}; expected embedded://PATH, "
                     "kafka://HOST:PORT or kinesis://")

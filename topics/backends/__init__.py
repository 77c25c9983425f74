"""Backends chosen by URL, as Faust does: `embedded:///path`, `kafka://host:port`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from topics.log import Log


def open_log(url: str, **options: object) -> Log:
    parsed = urlparse(url)
    if parsed.scheme in ("", "embedded", "file"):
        from topics.backends.embedded.log import EmbeddedLog

        path = parsed.path if parsed.scheme else url
        return EmbeddedLog(Path(path), fsync=bool(options.get("fsync", False)))
    if parsed.scheme == "kafka":
        raise NotImplementedError("the kafka backend is not built yet (issue: Kafka backend)")
    raise ValueError(f"unknown backend URL {url!r}; expected embedded://PATH or kafka://HOST:PORT")

"""Logging for operators: human lines by default, or one JSON object per line
(`--log-format json`) with the batch id, partition, task and member where they apply, so
that CloudWatch Logs Insights or Datadog can filter by batch.

Secrets are redacted in ONE place, `redact`, which every formatter (and the alerts and the
status page) passes its finished text through: a password in a connection URL
(postgresql://user:PASS@host), AWS access key ids and secret keys, key=value secrets
(password=, token=, ...), bearer tokens and webhook tokens (Slack's /services/... path).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("human", "json")
# Fields a log line carries when they apply: from `extra={...}` of a call, or bound for
# the whole process (`bind(member=...)`).
FIELDS = ("batch_id", "partition", "task", "member", "group", "cause")
MASK = "***"

_bound: ContextVar[dict[str, Any]] = ContextVar("streams_log_fields", default={})  # noqa: B039

_SECRETS: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host -> scheme://user:***@host (any scheme: postgresql,
    # redshift, kafka, https ...). The password may hold anything but '@', '/' and spaces.
    (re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)", re.I), r"\g<pre>***"),
    # AWS access key ids (long-term AKIA..., temporary ASIA...).
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b"), "AKIA" + MASK),
    # key=value or key: value secrets, in settings dumps, DSNs and environment echoes.
    (re.compile(r"(?P<pre>\b(?:aws_secret_access_key|aws_session_token|secret_access_key|"
                r"secret[_-]?key|password|passwd|pwd|token|api[_-]?key|secret)"
                r"[\"']?\s*[=:]\s*[\"']?)[^\s\"',;&]+", re.I), r"\g<pre>***"),
    # Authorization headers.
    (re.compile(r"(?P<pre>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\g<pre>***"),
    # Slack (and most chat) incoming webhooks carry their token in the path.
    (re.compile(r"(?P<pre>/services/)[A-Za-z0-9/_-]+"), r"\g<pre>***"),
    # A 40-character AWS secret key standing alone after a key id or "secret".
    (re.compile(r"(?P<pre>(?:secret|AKIA\*\*\*)\W{1,3})[A-Za-z0-9/+]{40}\b", re.I),
     r"\g<pre>***"),
]


def redact(text: str) -> str:
    """`text` with every secret this module knows replaced by ***."""
    if not text:
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def bind(**fields: Any) -> None:
    """Fields every later log line of this process (context) carries, e.g. the member."""
    _bound.set({**_bound.get(), **{k: v for k, v in fields.items() if v not in (None, "")}})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    found = dict(_bound.get())
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is not None and value != "":
            found[name] = value
    return found


class HumanFormatter(logging.Formatter):
    """`time LEVEL logger: message [task=... partition=...]`, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return redact(f"{line} [{extra}]" if extra else line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the FIELDS
    that apply, and the exception text if any; every string redacted."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps({k: redact(v) if isinstance(v, str) else v for k, v in out.items()},
                          ensure_ascii=False, default=str)


_format = "human"


def is_json() -> bool:
    return _format == "json"


def echo(text: str) -> None:
    """A line the CLI always shows on stderr (a worker started, stopped): as it is, or with
    --log-format json as a JSON line too, so that stderr stays one object per line."""
    if _format == "json":
        record = logging.LogRecord("streams.cli", logging.INFO, "", 0, text, None, None)
        sys.stderr.write(JsonFormatter().format(record) + "\n")
    else:
        sys.stderr.write(redact(text) + "\n")
    sys.stderr.flush()


def configure(verbosity: int = 0, fmt: str = "human", stream: TextIO | None = None) -> None:
    """The root logger: WARNING, -v INFO, -vv DEBUG; one handler on stderr in `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    global _format
    _format = fmt
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(max(verbosity, 0), 2)])

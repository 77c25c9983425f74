"""Helpers for the operator tests: a webhook that records what it receives (and can fail
the first attempts or hold requests), a free port, scraping /metrics, waiting on a bound."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def wait_for(condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "") -> Any:
    """Polls `condition` until it returns something truthy; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(0.05)


class RecordingWebhook:
    """A local HTTP server: records every POST (attempts, and the bodies it accepted);
    answers 500 to the first `fail_first` attempts; with `hold` set, keeps each request
    waiting until `release()`."""

    def __init__(self, fail_first: int = 0, hold: bool = False):
        self.attempts: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self._release = threading.Event()
        if not hold:
            self._release.set()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.attempts.append(body)
                    failing = len(outer.attempts) <= outer.fail_first
                outer._release.wait(30)
                code = 500 if failing else 200
                if not failing:
                    with outer._lock:
                        outer.accepted.append(body)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/XYZsecret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


def scrape(port: int, up: bool = False) -> dict[str, Any]:
    """/metrics parsed: family name -> family (prometheus_client's parser). `up`: the
    endpoint must answer; otherwise nothing is there yet ({}) while it is starting."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        if up:
            raise
        return {}
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str, **labels: str) -> list[Any]:
    """Samples named `name` (a family's sample, e.g. x_total or x_count) matching labels."""
    out = []
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s)
    return out


def total(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(s.value for s in samples(families, name, **labels))


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0

"""The Lambda Runtime API (the HTTP interface Lambda offers inside a function's container),
enough for awslambdaric to run a handler here as Lambda runs it: events are handed out by
`GET /2018-06-01/runtime/invocation/next`, results come back on `.../response` or
`.../error`. (AWS's Runtime Interface Emulator is on no registry reachable here.)"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/2018-06-01/runtime/invocation/"


class RuntimeApi:
    def __init__(self) -> None:
        self.events: queue.Queue[Any] = queue.Queue()
        self.results: queue.Queue[tuple[str, Any]] = queue.Queue()  # ("response"|"error", body)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != PREFIX + "next":
                    self.send_error(404)
                    return
                event = api.events.get()  # blocks, as Lambda's does, until an invocation
                body = json.dumps(event).encode()
                self.send_response(200)
                deadline = int((time.time() + 300) * 1000)
                for key, value in [
                        ("Lambda-Runtime-Aws-Request-Id", str(uuid.uuid4())),
                        ("Lambda-Runtime-Deadline-Ms", str(deadline)),
                        ("Lambda-Runtime-Invoked-Function-Arn",
                         "arn:aws:lambda:us-east-1:123456789012:function:test"),
                        ("Lambda-Runtime-Trace-Id", "Root=1-0-0"),
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(body)))]:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                kind = self.path.rsplit("/", 1)[-1]
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if self.path.startswith(PREFIX) and kind in ("response", "error"):
                    api.results.put((kind, json.loads(body or b"null")))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def invoke(self, event: Any, timeout_s: float = 60) -> tuple[str, Any]:
        self.events.put(event)
        return self.results.get(timeout=timeout_s)

    def __enter__(self) -> RuntimeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

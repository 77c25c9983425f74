"""A worker: runs tasks (processors and sinks) round-robin until asked to stop.

SIGTERM and SIGINT ask for a clean stop: the current step finishes, every task
checkpoints and gives its partitions back, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

log_ = logging.getLogger(__name__)


class Task(Protocol):
    name: str

    def step(self, max_messages: int = 32, timeout_s: float = 0.05) -> int: ...

    def checkpoint(self) -> None: ...

    def close(self) -> None: ...


class Worker:
    def __init__(self, tasks: list[Task]):
        self.tasks = tasks
        self.stopping = False
        self.processed: dict[str, int] = {t.name: 0 for t in tasks}
        self.rounds = 0  # full rounds of steps: after the first, every task has joined

    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log_.info("received %s: stopping after this step", signal.Signals(signum).name)
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, until: Callable[[], bool] | None = None,
            on_tick: Callable[[Worker], None] | None = None, tick_s: float = 1.0,
            timeout_s: float | None = None) -> bool:
        """Steps every task until stopped, `until()` holds, or `timeout_s` passes.
        Returns True when `until` was met."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        next_tick = time.monotonic() + tick_s
        try:
            while not self.stopping:
                busy = 0
                for task in self.tasks:
                    n = task.step(timeout_s=0.0)
                    self.processed[task.name] += n
                    busy += n
                self.rounds += 1
                now = time.monotonic()
                if on_tick is not None and now >= next_tick:
                    on_tick(self)
                    next_tick = now + tick_s
                if until is not None and not busy and until():
                    self.drain()
                    return True
                if deadline is not None and now >= deadline:
                    return False
                if not busy:
                    time.sleep(0.01)  # idle: let the log fill before polling again
            return False
        finally:
            self.close()

    def drain(self, max_rounds: int = 100) -> None:
        """Steps until no task has anything left: the last snapshots reach every sink."""
        for _ in range(max_rounds):
            if not sum(task.step(timeout_s=0.0) for task in self.tasks):
                return

    def close(self) -> None:
        for task in self.tasks:
            task.close()

"""Opening the warehouse while another process holds it.

DuckDB lets one process write a database file. Two `streams run` side by side, or a `run`
beside a worker of the warehouse role, meet there: the second process waits for the lock
(saying so once on stderr) instead of failing, up to a timeout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.2


class WarehouseBusy(TimeoutError):
    """Another process held the warehouse for longer than the timeout."""


def open_waiting(open_once: Callable[[], T], path: Path, timeout_s: float,
                 is_lock: Callable[[BaseException], bool],
                 say: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """open_once(), retried while it fails for a lock held elsewhere (is_lock)."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            return open_once()
        except Exception as exc:
            if not is_lock(exc):
                raise
            if time.monotonic() >= deadline:
                raise WarehouseBusy(
                    f"the warehouse {path} is still held by another process after "
                    f"{timeout_s:g}s (--warehouse-lock-timeout-s); stop the other run or "
                    "worker, or run the warehouse role in one process only") from None
            if not waited:
                say(f"waiting for the warehouse {path}: another process holds it (up to "
                    f"{timeout_s:g}s, --warehouse-lock-timeout-s)")
                waited = True
            sleep(POLL_S)

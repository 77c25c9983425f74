"""Named crash points for the crash tests: `STREAMS_CRASH_AT=name[:n]` makes the process
SIGKILL itself the n-th time (default 1st) it passes `crash_point(name)`. Unset, a crash
point is one dictionary lookup."""

from __future__ import annotations

import os
import signal

_TARGETS: dict[str, int] = {}
for _item in filter(None, os.environ.get("STREAMS_CRASH_AT", "").split(",")):
    _name, _, _n = _item.partition(":")
    _TARGETS[_name.strip()] = int(_n or 1)


def crash_point(name: str) -> None:
    if name in _TARGETS:
        _TARGETS[name] -= 1
        if _TARGETS[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


def crash_armed(name: str) -> bool:
    """True when `crash_point(name)` may kill: callers that must make a partial write
    durable first (to crash in the middle of it) check this."""
    return name in _TARGETS

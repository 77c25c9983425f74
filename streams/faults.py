"""Named fault points for the crash and zombie tests.

`STREAMS_CRASH_AT=name[:n]` makes the process SIGKILL itself the n-th time (default 1st)
it passes `crash_point(name)`; `STREAMS_PAUSE_AT=name[:n]` makes it SIGSTOP itself there
instead (a paused worker: its session expires while it sleeps, and it goes on from that
very point when the test sends SIGCONT). Unset, a fault point is one dictionary lookup."""

from __future__ import annotations

import os
import signal


def _targets(variable: str) -> dict[str, int]:
    targets = {}
    for item in filter(None, os.environ.get(variable, "").split(",")):
        name, _, n = item.partition(":")
        targets[name.strip()] = int(n or 1)
    return targets


_TARGETS = {name: (n, signal.SIGKILL) for name, n in _targets("STREAMS_CRASH_AT").items()}
_TARGETS.update({name: (n, signal.SIGSTOP) for name, n in _targets("STREAMS_PAUSE_AT").items()})


def crash_point(name: str) -> None:
    if name in _TARGETS:
        n, signum = _TARGETS[name]
        if n <= 1:
            del _TARGETS[name]  # a paused process that is woken goes on past it
            os.kill(os.getpid(), signum)
        else:
            _TARGETS[name] = (n - 1, signum)


def crash_armed(name: str) -> bool:
    """True when `crash_point(name)` may kill: callers that must make a partial write
    durable first (to crash in the middle of it) check this."""
    return name in _TARGETS

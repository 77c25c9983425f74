"""Progress of long work on stderr: a bar redrawn in place on a terminal, plain lines once a
second otherwise (logs, CI, pipes), nothing with -q.

On a terminal the import shows a bar of the bytes read against the file's size, its rows,
rows/s and an ETA; then one line for the processing phases (messages done per processor)
and the sinks (messages still behind, from their consumer groups' positions on the log).
`end()` finishes the line so that what follows starts on a clean one.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

BAR_WIDTH = 24
TTY_INTERVAL_S = 0.2  # redraws at most this often
LINE_INTERVAL_S = 1.0  # plain lines at most this often


class Progress:
    def __init__(self, quiet: bool, stream: TextIO | None = None, tty: bool | None = None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn = False  # a bar line is on screen, not yet ended

    # -- plain text (every caller; on a terminal it is the bar line's text) ----------------

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        interval = TTY_INTERVAL_S if self.tty else LINE_INTERVAL_S
        if self.quiet or (not force and now - self._last < interval):
            return
        self._last = now
        if self.tty:
            self._draw(f"[{now - self.started:6.1f}s] {text}")
        else:
            self.stream.write(f"[{now - self.started:6.1f}s] {text}\n")
            self.stream.flush()

    def due(self) -> bool:
        """Whether an update now would show (so callers can skip measuring it)."""
        interval = TTY_INTERVAL_S if self.tty else LINE_INTERVAL_S
        return not self.quiet and time.monotonic() - self._last >= interval

    # -- structured updates ------------------------------------------------------------

    def import_rows(self, rows: int, read: int | None = None, size: int | None = None) -> None:
        """`rows` read so far; `read` of `size` bytes of the input, when known."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = rows / elapsed
        if not self.tty:
            self(f"import: {rows:,} rows read")
            return
        text = f"import    {rows:,} rows  {_si(rate)} rows/s"
        if read is not None and size:
            done = min(read / size, 1.0)
            eta = elapsed * (1 - done) / done if done > 0 else None
            text = (f"import    {bar(done)} {done:4.0%}  {rows:,} rows  {_si(rate)} rows/s"
                    + (f"  ETA {eta:.0f}s" if eta is not None else ""))
        self(text)

    def phases(self, processed: dict[str, int], behind: dict[str, int]) -> None:
        """Messages done per processor here, and messages behind per sink group."""
        done = ", ".join(f"{name}: {n:,} messages" for name, n in processed.items())
        if not self.tty:
            self(done)
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        total = sum(processed.values())
        sinks = "  ".join(f"{name} {lag:,} behind" if lag else f"{name} caught up"
                          for name, lag in behind.items())
        self(f"process   {done}  ({_si(total / elapsed)} msg/s)  sinks: {sinks or '-'}")

    def end(self) -> None:
        """Finishes the bar line (a newline after it), so that output starts clean."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _draw(self, line: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + line[: max(width - 1, 10)] + "\x1b[K")
        self.stream.flush()
        self._drawn = True


def bar(done: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(done, 1.0)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _si(value: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def bytes_read(path: str) -> int | None:
    """How far this process has read `path`: the offset of an open descriptor of it (Linux's
    /proc; None elsewhere, or when it is not open). The readers stream the file through
    their own handles (csv, gzip, pyarrow), so this asks the kernel rather than them."""
    try:
        target = os.path.realpath(path)
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != target:
                    continue
                with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
                    for line in info:
                        if line.startswith("pos:"):
                            return int(line.split()[1])
            except OSError:
                continue
    except OSError:
        return None
    return None

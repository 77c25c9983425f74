"""`streams status BATCH --watch`: the status table, refreshed until the batch closes
(exit 0) or fails (exit 1); `--timeout` gives up (exit 1), Ctrl-C exits 130. On a terminal
the table is redrawn in place; otherwise a new table is printed only when it changed, so a
log of it stays short."""

from __future__ import annotations

import sys
import time
from typing import Any

import click


def watch_batch(ctx: click.Context, batch: str | None, interval_s: float,
                timeout_s: float | None) -> int:
    from streams.cli import UsageProblem, _pipeline, _settings, status_table

    if not batch:
        raise UsageProblem("--watch needs a BATCH to watch (streams status BATCH --watch)")
    spool_dir = _settings(ctx).spool_dir
    tty = sys.stdout.isatty()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pipe = _pipeline(ctx)
    shown: list[str] = []
    try:
        while True:
            batches = pipe.batches()
            if batch not in batches:
                raise UsageProblem(
                    f"no batch {batch}; known: {', '.join(sorted(batches)) or 'none'}")
            status = batches[batch]
            lines = status_table([status], spool_dir, batch)
            if lines != shown:
                _draw(lines, len(shown) if tty else 0)
                shown = lines
            if status.finished:
                return 0 if status.status == "closed" else 1
            if deadline is not None and time.monotonic() >= deadline:
                click.echo(f"Error: batch {batch} is still {status.status} after "
                           f"{timeout_s:g}s (--timeout)", err=True)
                return 1
            time.sleep(interval_s)  # the refresh interval the user asked for
    except KeyboardInterrupt:
        return 130
    finally:
        pipe.close()


def _draw(lines: list[str], replace: int, out: Any = None) -> None:
    """Prints `lines`, first moving up over the `replace` lines drawn before (a terminal)."""
    out = out or sys.stdout
    if replace:
        out.write(f"\x1b[{replace}F\x1b[J")
    out.write("\n".join(lines) + "\n")
    out.flush()

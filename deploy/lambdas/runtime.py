"""What every handler shares: settings from STREAMS_* variables only, the pipeline opened
from them, and one way to refuse a bad event or a bad configuration.

A handler raises BadEvent (an event it cannot act on) or BadConfiguration (a setting of the
function is wrong): Lambda reports the exception's type and one-line message as the
invocation's error (`errorType`, `errorMessage`), which the state machine's Catch records as
the failed step's error. Neither is worth a retry: the state machine retries only Lambda's
own transient errors.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deploy.s3_events import BadEvent
from streams.settings import Settings

__all__ = ["BadConfiguration", "BadEvent", "now_ms", "pipeline", "settings"]


class BadConfiguration(ValueError):
    """A STREAMS_* variable of the function is missing or wrong; the message names it."""


def settings(require: tuple[str, ...] = ()) -> Settings:
    """The function's settings; BadConfiguration naming the first problem. `require`: names
    of settings that must not be empty here (e.g. "status_table")."""
    _logging()
    try:
        chosen = Settings.from_env(dict(os.environ))
    except ValueError as exc:
        raise BadConfiguration(str(exc)) from None
    problems = chosen.problems()
    for name in require:
        if not getattr(chosen, name):
            problems.append(f"STREAMS_{name.upper()} is not set; this handler needs it")
    if problems:
        raise BadConfiguration("; ".join(problems))
    return chosen


@contextmanager
def pipeline(chosen: Settings) -> Iterator[Any]:
    """The project's composition root on these settings, closed after use."""
    from streams.pipeline import Pipeline

    try:
        chosen.data_dir.mkdir(parents=True, exist_ok=True)  # Lambda: under /tmp
        pipe = Pipeline(chosen)
    except (OSError, ValueError) as exc:
        raise BadConfiguration(f"opening the pipeline ({chosen.log_url}): {exc}") from None
    try:
        yield pipe
    finally:
        pipe.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def _logging() -> None:
    # Logs go to stdout (CloudWatch Logs takes the function's stdout and stderr).
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")

"""npm packages the tests need (kinesalite, asl-validator), installed on first use into a
cache directory kept across runs (`STREAMS_TEST_CACHE`, default ~/.cache/audience-streams)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("STREAMS_TEST_CACHE", Path.home() / ".cache" / "audience-streams"))


def npm_install(package: str, version: str) -> Path:
    """The prefix directory holding `node_modules/<package>` at `version`."""
    prefix = CACHE / f"{package}-{version}"
    if (prefix / "node_modules" / package / "package.json").is_file():
        return prefix
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"{package} needs node and npm on PATH (apt-get install nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                    f"{package}@{version}"], check=True, capture_output=True, timeout=300)
    return prefix

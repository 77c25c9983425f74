"""Shared test helpers: input generators, an independent expected-membership fold, and a
CLI runner that starts `streams` as a real process."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent


def write_csv(path: Path, rows: Iterable[tuple[str, str, str]], with_op: bool = True) -> Path:
    """rows: (user_id, segment_id, op)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "segment_id", "op"] if with_op else ["user_id", "segment_id"])
        for user, segment, op in rows:
            w.writerow([user, segment, op] if with_op else [user, segment])
    return path


def random_rows(n: int, users: int, segments: int, seed: int,
                remove_share: float = 0.2) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [(f"user-{rng.randrange(users)}", f"seg-{rng.randrange(segments)}",
             "remove" if rng.random() < remove_share else "add") for _ in range(n)]


def expected_members(batches: Iterable[tuple[str, list[tuple[str, str, str]]]],
                     start: set[tuple[str, str]] | None = None) -> set[tuple[str, str]]:
    """Independent model: (mode, rows) per batch in order -> set of (segment, user)."""
    members = set(start or ())
    for mode, rows in batches:
        listed: set[tuple[str, str]] = set()
        for user, segment, op in rows:
            if op == "add":
                members.add((segment, user))
                listed.add((segment, user))
            else:
                members.discard((segment, user))
                listed.discard((segment, user))
        if mode == "replace":
            named = {segment for _u, segment, _o in rows}
            members = {(s, u) for s, u in members if s not in named or (s, u) in listed}
    return members


def run_cli(*args: str, data_dir: Path, env: dict[str, str] | None = None,
            timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "STREAMS_DATA_DIR": str(data_dir), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "streams", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=data_dir.parent)
    if check and proc.returncode != 0:
        raise AssertionError(f"streams {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def warehouse_members(data_dir: Path) -> list[tuple[str, str]]:
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        return sorted(con.execute(
            "SELECT segment_id, user_id FROM segment_members").fetchall())
    finally:
        con.close()

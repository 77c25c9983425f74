"""A fast, seeded generator of audience CSV files for benchmarks.

    python -m benchmarks.generate OUT.csv --rows 1000000 [--users N] [--segments 20]
        [--seed 1] [--remove-share 0.0] [--op-column]

Columns: `user_id,segment_id` (and `op` with --op-column or a --remove-share above 0).
User ids are drawn uniformly, with replacement, from `--users` distinct ids (default: as
many as rows, so about 63% of the rows name a user once); segments uniformly from
`--segments`. The same arguments give the same bytes on every machine (random.Random is
stable across Python versions for `random()` and `choices`). About 1 s per million rows;
memory is bounded by writing in blocks.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BLOCK_ROWS = 200_000


@dataclass(frozen=True)
class Spec:
    """What a generated file holds; also its cache key in benchmarks.run."""

    rows: int
    users: int | None = None  # None: as many distinct users as rows
    segments: int = 20
    seed: int = 1
    remove_share: float = 0.0
    op_column: bool = False

    @property
    def user_pool(self) -> int:
        return max(1, self.users if self.users is not None else self.rows)

    @property
    def with_op(self) -> bool:
        return self.op_column or self.remove_share > 0

    def file_name(self) -> str:
        ops = f"-rm{self.remove_share:g}" if self.with_op else ""
        return (f"audience-r{self.rows}-u{self.user_pool}-s{self.segments}"
                f"-seed{self.seed}{ops}.csv")


def generate(path: str | os.PathLike[str], spec: Spec) -> Path:
    """Writes the file atomically (a temp name, then a rename) and returns its path."""
    if spec.rows < 1 or spec.segments < 1:
        raise ValueError("rows and segments must be at least 1")
    if not 0.0 <= spec.remove_share <= 1.0:
        raise ValueError("remove_share must be within 0..1")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rng = random.Random(spec.seed)
    pool = spec.user_pool
    segment_names = [f"seg-{i:04d}" for i in range(spec.segments)]
    users = range(pool)
    share = spec.remove_share
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("user_id,segment_id,op\n" if spec.with_op else "user_id,segment_id\n")
            done = 0
            while done < spec.rows:
                n = min(BLOCK_ROWS, spec.rows - done)
                user_col = rng.choices(users, k=n)
                seg_col = rng.choices(segment_names, k=n)
                if spec.with_op:
                    rnd = rng.random
                    ops = ["remove" if rnd() < share else "add" for _ in range(n)]
                    f.write("".join(map("user-{:010d},{},{}\n".format, user_col, seg_col, ops)))
                else:
                    f.write("".join(map("user-{:010d},{}\n".format, user_col, seg_col)))
                done += n
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="CSV file to write")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--users", type=int, default=None,
                   help="distinct user ids to draw from [default: --rows]")
    p.add_argument("--segments", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--remove-share", type=float, default=0.0,
                   help="share of rows with op=remove (implies --op-column)")
    p.add_argument("--op-column", action="store_true", help="write an op column")
    args = p.parse_args(argv)
    spec = Spec(args.rows, args.users, args.segments, args.seed, args.remove_share,
                args.op_column)
    started = time.perf_counter()
    try:
        out = generate(args.out, spec)
    except ValueError as exc:
        p.error(str(exc))
    took = time.perf_counter() - started
    print(f"wrote {spec.rows:,} rows ({out.stat().st_size / 1e6:.1f} MB) to {out} "
          f"in {took:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

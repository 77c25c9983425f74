"""PostgreSQL warehouse load rate: changed rows per second through binary COPY into
staging (PostgresWarehouse.stage) and through the merge, on an embedded server.

    python -m benchmarks.postgres_copy [--rows 1000000] [--chunk-rows 100000]
"""

from __future__ import annotations

import argparse
import time

from connectors.change_set import ChangeSet
from connectors.warehouses.postgres import PostgresWarehouse
from tests.postgres_server import fresh_database, postgres_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk-rows", type=int, default=100_000)
    args = ap.parse_args()
    n, size = args.rows, args.chunk_rows
    chunks = []
    for start in range(0, n, size):
        m = min(size, n - start)
        chunks.append(ChangeSet.from_lists(
            "bench", 0, 10 + start, [f"user-{start + i}" for i in range(m)],
            [f"seg-{(start + i) % 20}" for i in range(m)], ["add"] * m,
            list(range(start + 1, start + m + 1)),
            source_positions=[10 + start + i // 5000 for i in range(m)], parts=[0] * m))
    with postgres_server() as admin:
        with PostgresWarehouse(fresh_database(admin)) as wh:
            started = time.perf_counter()
            for c in chunks:
                wh.stage(c)
            staged = time.perf_counter()
            result = wh.merge("bench", 0, 10 + n)
            merged = time.perf_counter()
        assert result.added == n, result
        copy_s, merge_s = staged - started, merged - staged
        print(f"{n:,} changed rows in chunks of {size:,}: COPY into staging {copy_s:.2f}s "
              f"({n / copy_s:,.0f} rows/s), merge {merge_s:.2f}s ({n / merge_s:,.0f} rows/s), "
              f"end to end {n / (copy_s + merge_s):,.0f} rows/s")


if __name__ == "__main__":
    main()

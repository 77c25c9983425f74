"""Regression: `streams import` of a CSV loaded pyarrow and DuckDB's dependencies through
the warehouse URL check of the settings (connectors.warehouses imported its base module,
which imports pyarrow): ~50 MB more in the process that imports and runs the processors,
which took the 1M-row `streams run` past its 500 MB target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import atexit, sys
heavy = ("pyarrow", "duckdb", "numpy", "psycopg", "boto3")
atexit.register(lambda: print("LOADED", [m for m in heavy if m in sys.modules]))
from streams.cli import main
sys.argv = ["streams", "--data-dir", sys.argv[1], "import", sys.argv[2], "-q"]
main()
"""


def test_importing_a_csv_loads_no_arrow_duckdb_or_clients(tmp_path: Path) -> None:
    csv = tmp_path / "users.csv"
    csv.write_text("user_id,segment_id\n" + "".join(f"u{i},s{i % 3}\n" for i in range(50)))
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "data"), str(csv)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "published" in done.stdout or "rows" in done.stdout, done.stdout
    assert "LOADED []" in done.stdout, done.stdout

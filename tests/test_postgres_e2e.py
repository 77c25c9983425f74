"""End to end through the `streams` CLI with the warehouse on PostgreSQL (the session's
embedded server): an add batch, a replace batch and a remove-heavy batch, chunks small
enough that batches span many COPYs; the warehouse equals the independent model and
`streams verify` agrees with every output."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from tests.support import expected_members, random_rows, run_cli, write_csv


def test_run_and_replace_on_postgres_then_verify(tmp_path: Path, postgres_url: str) -> None:
    data = tmp_path / "data"
    env = {"STREAMS_WAREHOUSE": postgres_url, "STREAMS_CHUNK_ROWS": "1000"}
    first = random_rows(12_000, users=4_000, segments=4, seed=11, remove_share=0.1)
    second = [(u, "seg-1", op) for u, _s, op in
              random_rows(2_000, users=5_000, segments=1, seed=12, remove_share=0.05)]
    third = random_rows(3_000, users=4_000, segments=4, seed=13, remove_share=0.8)
    batches = [("add", first), ("replace", second), ("add", third)]
    for i, (mode, rows) in enumerate(batches):
        path = write_csv(tmp_path / f"in-{i}.csv", rows)
        proc = run_cli("--warehouse", postgres_url, "run", str(path), "--mode", mode,
                       "--batch-id", f"b{i}", "-q", data_dir=data, env=env)
        assert "status      closed" in proc.stdout, proc.stdout
        with psycopg.connect(postgres_url) as con:
            members = con.execute("SELECT segment_id, user_id FROM segment_members").fetchall()
        assert len(members) == len(set(members))
        assert set(members) == expected_members(batches[:i + 1])
    with psycopg.connect(postgres_url) as con:
        ledger = con.execute("SELECT batch_id, count(*) FROM load_ledger GROUP BY 1"
                             " ORDER BY 1").fetchall()
        status = con.execute("SELECT batch_id, status FROM batch_status ORDER BY 1").fetchall()
        staged = con.execute("SELECT count(*) FROM staged_changes").fetchone()
    partitions = ledger[0][1]
    assert ledger == [("b0", partitions), ("b1", partitions), ("b2", partitions)]
    assert status == [("b0", "closed"), ("b1", "closed"), ("b2", "closed")]
    assert staged == (0,)  # nothing left behind in staging
    found = json.loads(run_cli("status", "--json", data_dir=data, env=env).stdout)
    assert all(s["locations"]["warehouse"].endswith("#segment_members") for s in found)
    assert "secret" not in json.dumps(found)
    checked = run_cli("verify", data_dir=data, env=env, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr

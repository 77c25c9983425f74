"""DuckDBWarehouse: idempotent staging, exactly-once merges, status upserts, retries."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.change_set import ChangeSet
from connectors.warehouse import (
    DuckDBWarehouse,
    LedgerRow,
    LoadResult,
    WarehouseError,
    is_transient,
)

Change = tuple[str, str, str, int]  # (user_id, segment_id, op, seq)


def chunk(batch: str, partition: int, first_position: int, changes: list[Change]) -> ChangeSet:
    return ChangeSet.from_lists(
        batch_id=batch,
        partition=partition,
        first_position=first_position,
        user_ids=[c[0] for c in changes],
        segment_ids=[c[1] for c in changes],
        ops=[c[2] for c in changes],
        seqs=[c[3] for c in changes],
    )


def table_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read through a second connection: sees only what the warehouse committed."""
    con = duckdb.connect(str(path))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def member_rows(path: Path) -> list[tuple[object, ...]]:
    return table_rows(
        path,
        "SELECT segment_id, user_id, batch_id, updated_seq FROM segment_members ORDER BY 1, 2",
    )


def staged_count(wh: DuckDBWarehouse) -> int:
    """Staging is a TEMP table: only the warehouse's own connection sees it."""
    return wh._query("count staged", "SELECT count(*) FROM staged_changes")[0][0]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "warehouse.duckdb"


@pytest.fixture
def wh(db: Path) -> Iterator[DuckDBWarehouse]:
    with DuckDBWarehouse(db) as warehouse:
        yield warehouse


def counts(ledger: list[LedgerRow]) -> list[tuple[str, int, int, int, int]]:
    return [(r.batch_id, r.partition, r.rows_loaded, r.added, r.removed) for r in ledger]


# -- merge semantics ---------------------------------------------------------------------


def test_staging_a_chunk_twice_applies_it_once(wh: DuckDBWarehouse, db: Path) -> None:
    first = chunk("b1", 0, 0, [("u1", "s1", "add", 1), ("u2", "s1", "add", 2)])
    second = chunk("b1", 0, 2, [("u3", "s2", "add", 3)])
    wh.stage(first)
    wh.stage(second)
    wh.stage(first)  # re-sent after a crash
    assert staged_count(wh) == 3
    assert not wh.is_loaded("b1", 0)
    result = wh.merge("b1", 0)
    assert result == LoadResult("b1", 0, rows_loaded=3, added=3, removed=0)
    assert wh.is_loaded("b1", 0)
    assert wh.members() == [("s1", "u1"), ("s1", "u2"), ("s2", "u3")]
    assert staged_count(wh) == 0
    assert counts(wh.ledger()) == [("b1", 0, 3, 3, 0)]


def test_merge_twice_is_a_no_op(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))
    assert wh.merge("b1", 0) == LoadResult("b1", 0, 1, 1, 0)
    before = member_rows(db)
    again = wh.merge("b1", 0)
    assert again == LoadResult("b1", 0, 1, 1, 0, already_loaded=True)
    assert member_rows(db) == before == [("s1", "u1", "b1", 1)]
    assert counts(wh.ledger()) == [("b1", 0, 1, 1, 0)]


def test_chunk_resent_after_merge_is_not_staged_again(wh: DuckDBWarehouse, db: Path) -> None:
    c = chunk("b1", 0, 0, [("u1", "s1", "add", 1)])
    wh.stage(c)
    wh.merge("b1", 0)
    wh.stage(c)
    assert staged_count(wh) == 0  # would otherwise linger forever
    assert wh.merge("b1", 0).already_loaded
    assert wh.members() == [("s1", "u1")]


def test_add_then_remove_in_one_batch_leaves_no_row(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1), ("u1", "s1", "remove", 2)]))
    wh.stage(chunk("b1", 0, 2, [("u2", "s1", "add", 3)]))
    wh.stage(chunk("b1", 0, 3, [("u2", "s1", "remove", 4), ("u3", "s1", "remove", 5)]))
    wh.stage(chunk("b1", 0, 5, [("u3", "s1", "add", 6)]))  # remove then add: present
    assert wh.merge("b1", 0) == LoadResult("b1", 0, rows_loaded=6, added=1, removed=0)
    assert member_rows(db) == [("s1", "u3", "b1", 6)]


def test_remove_of_a_non_member_is_harmless(wh: DuckDBWarehouse) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))
    wh.merge("b1", 0)
    wh.stage(chunk("b2", 0, 0, [("u9", "s1", "remove", 1), ("u1", "s9", "remove", 2)]))
    assert wh.merge("b2", 0) == LoadResult("b2", 0, rows_loaded=2, added=0, removed=0)
    assert wh.members() == [("s1", "u1")]


def test_chunks_apply_in_log_order_and_rows_in_chunk_order(wh: DuckDBWarehouse, db: Path) -> None:
    # Staged out of order; the end-marker removal (seq -1) follows the add in its chunk,
    # so it wins although its seq is lower.
    wh.stage(chunk("b1", 0, 100, [("u1", "s1", "remove", 7), ("u2", "s1", "add", 8)]))
    wh.stage(chunk("b1", 0, 5, [("u1", "s1", "add", 1), ("u2", "s1", "remove", 2)]))
    wh.stage(chunk("b1", 0, 200, [("u3", "s1", "add", 9), ("u3", "s1", "remove", -1)]))
    assert wh.merge("b1", 0) == LoadResult("b1", 0, rows_loaded=6, added=1, removed=0)
    assert member_rows(db) == [("s1", "u2", "b1", 8)]


def test_two_batches_in_sequence(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(
        chunk(
            "b1",
            0,
            0,
            [("u1", "s1", "add", 1), ("u2", "s1", "add", 2), ("u3", "s2", "add", 3)],
        )
    )
    wh.stage(chunk("b1", 1, 0, [("u4", "s1", "add", 4)]))
    wh.merge("b1", 0)
    wh.merge("b1", 1)
    wh.stage(
        chunk(
            "b2",
            0,
            0,
            [("u1", "s1", "remove", 1), ("u2", "s1", "add", 2), ("u5", "s2", "add", 3)],
        )
    )
    wh.stage(chunk("b2", 1, 0, [("u4", "s1", "remove", -1)]))
    assert wh.merge("b2", 0) == LoadResult("b2", 0, rows_loaded=3, added=1, removed=1)
    assert wh.merge("b2", 1) == LoadResult("b2", 1, rows_loaded=1, added=0, removed=1)
    assert member_rows(db) == [
        ("s1", "u2", "b2", 2),  # re-added: refreshed, not duplicated
        ("s2", "u3", "b1", 3),
        ("s2", "u5", "b2", 3),
    ]
    assert wh.members("s2") == [("s2", "u3"), ("s2", "u5")]
    assert wh.members("nope") == []
    assert counts(wh.ledger()) == [
        ("b1", 0, 3, 3, 0),
        ("b1", 1, 1, 1, 0),
        ("b2", 0, 3, 1, 1),
        ("b2", 1, 1, 0, 1),
    ]
    assert all(isinstance(r.loaded_at, datetime) for r in wh.ledger())


def test_partitions_merge_independently(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))
    wh.stage(chunk("b1", 1, 0, [("u2", "s1", "add", 2)]))
    wh.merge("b1", 1)
    assert wh.members() == [("s1", "u2")]
    assert staged_count(wh) == 1
    assert (wh.is_loaded("b1", 0), wh.is_loaded("b1", 1)) == (False, True)


def test_merge_with_nothing_staged_records_an_empty_load(wh: DuckDBWarehouse) -> None:
    assert wh.merge("b1", 2) == LoadResult("b1", 2, 0, 0, 0)
    assert counts(wh.ledger()) == [("b1", 2, 0, 0, 0)]


def test_reopening_keeps_data_and_schema(db: Path) -> None:
    with DuckDBWarehouse(db) as first:
        first.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))
        first.merge("b1", 0)
    with DuckDBWarehouse(db) as again:
        assert again.members() == [("s1", "u1")]
        assert again.is_loaded("b1", 0)


# -- batch status ------------------------------------------------------------------------


def test_threads_and_memory_limit_are_set_on_the_connection(db: Path) -> None:
    wh = DuckDBWarehouse(db, threads=1, memory_limit="64MB")
    try:
        ((threads, limit),) = wh._query(
            "settings", "SELECT current_setting('threads'), current_setting('memory_limit')")
        assert threads == 1 and limit.endswith("MiB") and float(limit.split()[0]) < 64
    finally:
        wh.close()


def test_a_bad_memory_limit_names_the_setting_and_the_file(db: Path) -> None:
    with pytest.raises(WarehouseError, match=r"setting memory_limit to 'lots' failed on DuckDB "
                       rf"database {re.escape(str(db))}: .*Memory must have a number"):
        DuckDBWarehouse(db, memory_limit="lots")
    DuckDBWarehouse(db).close()  # the failed one let go of the file


def test_upsert_batch_status(wh: DuckDBWarehouse) -> None:
    wh.upsert_batch_status(
        [
            {"batch_id": "b1", "status": "submitted", "submitted_at": 1_700_000_000_123},
            {"batch_id": "b2", "status": "submitted", "rows": 5},
        ]
    )
    wh.upsert_batch_status(
        [
            {
                "batch_id": "b1",
                "status": "published",
                "rows": 10,
                "rejected": 1,
                "partitions": 4,
                "submitted_at": 1_700_000_000_123,
                "published_at": 1_700_000_001_000,
                "detail": {"per_partition": [3, 3, 2, 2], "a": None},
            },
            {"batch_id": "b3", "status": "failed", "failed_at": 5, "error": "boom"},
            {"batch_id": "b3", "status": "failed", "failed_at": 6, "error": "bang"},
        ]
    )
    wh.upsert_batch_status([])
    assert wh.batch_status("b1") == {
        "batch_id": "b1",
        "status": "published",
        "rows": 10,
        "rejected": 1,
        "partitions": 4,
        "submitted_at": 1_700_000_000_123,
        "published_at": 1_700_000_001_000,
        "closed_at": None,
        "failed_at": None,
        "error": None,
        "detail": '{"a": null, "per_partition": [3, 3, 2, 2]}',
    }
    b2 = wh.batch_status("b2")
    assert b2 is not None and (b2["status"], b2["rows"]) == ("submitted", 5)
    b3 = wh.batch_status("b3")
    assert b3 is not None and (b3["failed_at"], b3["error"]) == (6, "bang")  # last wins
    assert wh.batch_status("nope") is None


def test_upsert_batch_status_rejects_bad_rows(wh: DuckDBWarehouse) -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['statuz'\]"):
        wh.upsert_batch_status([{"batch_id": "b1", "statuz": "x"}])
    with pytest.raises(ValueError, match="without batch_id"):
        wh.upsert_batch_status([{"status": "x"}])
    assert wh.batch_status("b1") is None


# -- errors and retries ------------------------------------------------------------------


def test_is_transient() -> None:
    assert is_transient(duckdb.TransactionException("TransactionContext Error: Conflict"))
    assert is_transient(duckdb.IOException('Could not set lock on file "x.db"'))
    assert not is_transient(duckdb.TransactionException("cannot commit - no transaction"))
    assert not is_transient(duckdb.BinderException("no such column"))
    assert not is_transient(ValueError("conflict"))


def test_write_conflict_is_retried_after_backoff(wh: DuckDBWarehouse, db: Path) -> None:
    wh.upsert_batch_status([{"batch_id": "b1", "status": "submitted"}])
    other = duckdb.connect(str(db))  # another writer, same database
    other.execute("BEGIN")
    other.execute("UPDATE batch_status SET error = 'held' WHERE batch_id = 'b1'")
    slept: list[float] = []

    def backoff(seconds: float) -> None:
        slept.append(seconds)
        other.execute("COMMIT")  # the other writer finishes while we back off

    conflicted = DuckDBWarehouse(db, backoff_s=0.05, sleep=backoff)
    conflicted.upsert_batch_status([{"batch_id": "b1", "status": "closed"}])
    other.close()
    assert len(slept) == 1 and 0.025 <= slept[0] <= 0.05
    status = wh.batch_status("b1")
    assert status is not None and (status["status"], status["error"]) == ("closed", None)


def test_lock_held_by_another_process_fails_after_bounded_retries(tmp_path: Path) -> None:
    db = tmp_path / "locked.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys\n"
            "con = duckdb.connect(sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
            "con.close()\n",
            str(db),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        slept: list[float] = []
        with pytest.raises(WarehouseError) as info:
            DuckDBWarehouse(db, attempts=3, backoff_s=0.05, sleep=slept.append)
        message = str(info.value)
        assert str(db) in message and "after 3 attempts" in message
        assert "lock" in message.lower()
        assert len(slept) == 2
        assert 0.025 <= slept[0] <= 0.05 and 0.05 <= slept[1] <= 0.1
    finally:
        holder.communicate(input="", timeout=60)
    assert holder.returncode == 0
    with DuckDBWarehouse(db) as now_free:  # the lock is gone with the other process
        assert now_free.members() == []


def test_non_transient_error_names_the_file_without_retrying(tmp_path: Path) -> None:
    not_a_db = tmp_path / "garbage.duckdb"
    not_a_db.write_bytes(b"this is not a database file" * 200)
    slept: list[float] = []
    with pytest.raises(WarehouseError, match="open failed on DuckDB database") as info:
        DuckDBWarehouse(not_a_db, sleep=slept.append)
    assert str(not_a_db) in str(info.value)
    assert slept == []


def test_failed_transaction_rolls_back(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))

    def half_done(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("DELETE FROM staged_changes")
        con.execute("SELECT no_such_column FROM staged_changes")

    with pytest.raises(WarehouseError, match="Binder Error"):
        wh._transaction("test", half_done)  # the private seam every write goes through
    assert staged_count(wh) == 1
    assert wh.merge("b1", 0) == LoadResult("b1", 0, 1, 1, 0)


# -- property: merge == fold ---------------------------------------------------------------

USERS = [f"u{i}" for i in range(5)]
SEGMENTS = ["s0", "s1"]


def partition_of(user: str) -> int:
    return int(user[1:]) % 2  # records are keyed by user: one user, one partition


@st.composite
def batches(draw: st.DrawFn) -> list[list[Change]]:
    """1-3 batches of changes; seq -1 marks end-marker removals (not ordered by seq)."""
    result = []
    for _ in range(draw(st.integers(1, 3))):
        rows = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(USERS),
                    st.sampled_from(SEGMENTS),
                    st.sampled_from(["add", "remove"]),
                    st.booleans(),
                ),
                max_size=25,
            )
        )
        result.append(
            [
                (u, s, op, -1 if marker and op == "remove" else i)
                for i, (u, s, op, marker) in enumerate(rows)
            ]
        )
    return result


# 40 examples: each is ~30 staging and ~24 merge transactions on a fresh database file.
@settings(max_examples=40, deadline=None)
@given(data=st.data(), history=batches())
def test_merge_equals_python_fold(data: st.DataObject, history: list[list[Change]]) -> None:
    chunks: list[ChangeSet] = []
    for b, changes in enumerate(history):
        for p in (0, 1):
            part = [c for c in changes if partition_of(c[0]) == p]
            cuts = data.draw(st.lists(st.booleans(), min_size=len(part), max_size=len(part)))
            start = 0
            for i in range(1, len(part) + 1):
                if i == len(part) or cuts[i]:
                    # first_position: any increasing log position, here 10 * index + 3.
                    chunks.append(chunk(f"b{b}", p, 10 * start + 3, part[start:i]))
                    start = i
    order = data.draw(st.permutations(chunks))
    resent = data.draw(st.lists(st.sampled_from(chunks), max_size=3)) if chunks else []

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "fold.duckdb"
        with DuckDBWarehouse(db) as wh:
            for c in [*order, *resent]:
                wh.stage(c)
            expected: dict[tuple[str, str], tuple[str, int]] = {}
            for b, changes in enumerate(history):
                for p in data.draw(st.permutations([0, 1])):
                    before = set(expected)
                    for user, segment, op, seq in changes:
                        if partition_of(user) != p:
                            continue
                        if op == "add":
                            expected[(segment, user)] = (f"b{b}", seq)
                        else:
                            expected.pop((segment, user), None)
                    n = sum(partition_of(c[0]) == p for c in changes)
                    added, removed = len(set(expected) - before), len(before - set(expected))
                    assert wh.merge(f"b{b}", p) == LoadResult(f"b{b}", p, n, added, removed)
                    assert wh.merge(f"b{b}", p).already_loaded
            assert member_rows(db) == sorted((s, u, b, q) for (s, u), (b, q) in expected.items())
            assert staged_count(wh) == 0

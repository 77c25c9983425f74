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
from connectors.warehouses.base import LedgerRow, LoadResult, WarehouseError
from connectors.warehouses.duckdb import DuckDBWarehouse, is_transient

Change = tuple[str, str, str, int]  # (user_id, segment_id, op, seq)


def chunk(batch: str, partition: int, first_position: int, changes: list[Change],
          first_part: int = 0, stamps: list[tuple[int, int]] | None = None) -> ChangeSet:
    """One message's changes at (first_position, first_part), or each at its stamp."""
    return ChangeSet.from_lists(
        batch_id=batch,
        partition=partition,
        first_position=first_position,
        user_ids=[c[0] for c in changes],
        segment_ids=[c[1] for c in changes],
        ops=[c[2] for c in changes],
        seqs=[c[3] for c in changes],
        first_part=first_part,
        source_positions=None if stamps is None else [position for position, _ in stamps],
        parts=None if stamps is None else [part for _, part in stamps],
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
    result = wh.merge("b1", 0, end_position=9)
    assert result == LoadResult("b1", 0, rows_loaded=3, added=3, removed=0)
    assert wh.is_loaded("b1", 0)
    assert wh.members() == [("s1", "u1"), ("s1", "u2"), ("s2", "u3")]
    assert staged_count(wh) == 0
    assert counts(wh.ledger()) == [("b1", 0, 3, 3, 0)]


def test_merge_twice_is_a_no_op(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))
    assert wh.merge("b1", 0, 9) == LoadResult("b1", 0, 1, 1, 0)
    before = member_rows(db)
    again = wh.merge("b1", 0, 9)
    assert again == LoadResult("b1", 0, 1, 1, 0, already_loaded=True)
    assert member_rows(db) == before == [("s1", "u1", "b1", 1)]
    assert counts(wh.ledger()) == [("b1", 0, 1, 1, 0)]


def test_chunk_resent_after_merge_is_not_staged_again(wh: DuckDBWarehouse, db: Path) -> None:
    c = chunk("b1", 0, 0, [("u1", "s1", "add", 1)])
    wh.stage(c)
    wh.merge("b1", 0, 9)
    wh.stage(c)
    assert staged_count(wh) == 0  # would otherwise linger forever
    assert wh.merge("b1", 0, 9).already_loaded
    assert wh.members() == [("s1", "u1")]


def test_add_then_remove_in_one_batch_leaves_no_row(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1), ("u1", "s1", "remove", 2)]))
    wh.stage(chunk("b1", 0, 2, [("u2", "s1", "add", 3)]))
    wh.stage(chunk("b1", 0, 3, [("u2", "s1", "remove", 4), ("u3", "s1", "remove", 5)]))
    wh.stage(chunk("b1", 0, 5, [("u3", "s1", "add", 6)]))  # remove then add: present
    assert wh.merge("b1", 0, 9) == LoadResult("b1", 0, rows_loaded=6, added=1, removed=0)
    assert member_rows(db) == [("s1", "u3", "b1", 6)]


def test_remove_of_a_non_member_is_harmless(wh: DuckDBWarehouse) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))
    wh.merge("b1", 0, 9)
    wh.stage(chunk("b2", 0, 10, [("u9", "s1", "remove", 1), ("u1", "s9", "remove", 2)]))
    assert wh.merge("b2", 0, 19) == LoadResult("b2", 0, rows_loaded=2, added=0, removed=0)
    assert wh.members() == [("s1", "u1")]


def test_chunks_apply_in_log_order_and_rows_in_chunk_order(wh: DuckDBWarehouse, db: Path) -> None:
    # Staged out of order; the end-marker removal (seq -1) follows the add in its chunk,
    # so it wins although its seq is lower.
    wh.stage(chunk("b1", 0, 100, [("u1", "s1", "remove", 7), ("u2", "s1", "add", 8)]))
    wh.stage(chunk("b1", 0, 5, [("u1", "s1", "add", 1), ("u2", "s1", "remove", 2)]))
    wh.stage(chunk("b1", 0, 200, [("u3", "s1", "add", 9), ("u3", "s1", "remove", -1)]))
    assert wh.merge("b1", 0, 300) == LoadResult("b1", 0, rows_loaded=6, added=1, removed=0)
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
    wh.merge("b1", 0, 9)
    wh.merge("b1", 1, 9)
    wh.stage(
        chunk(
            "b2",
            0,
            10,
            [("u1", "s1", "remove", 1), ("u2", "s1", "add", 2), ("u5", "s2", "add", 3)],
        )
    )
    wh.stage(chunk("b2", 1, 10, [("u4", "s1", "remove", -1)]))
    assert wh.merge("b2", 0, 19) == LoadResult("b2", 0, rows_loaded=3, added=1, removed=1)
    assert wh.merge("b2", 1, 19) == LoadResult("b2", 1, rows_loaded=1, added=0, removed=1)
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
    wh.merge("b1", 1, 9)
    assert wh.members() == [("s1", "u2")]
    assert staged_count(wh) == 1
    assert (wh.is_loaded("b1", 0), wh.is_loaded("b1", 1)) == (False, True)


def test_merge_with_nothing_staged_records_an_empty_load(wh: DuckDBWarehouse) -> None:
    assert wh.merge("b1", 2, 9) == LoadResult("b1", 2, 0, 0, 0)
    assert counts(wh.ledger()) == [("b1", 2, 0, 0, 0)]


def test_reopening_keeps_data_and_schema(db: Path) -> None:
    with DuckDBWarehouse(db) as first:
        first.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1)]))
        first.merge("b1", 0, 9)
    with DuckDBWarehouse(db) as again:
        assert again.members() == [("s1", "u1")]
        assert again.is_loaded("b1", 0)


# -- merge in log order ------------------------------------------------------------------


def test_replace_removals_spanning_chunks_are_staged_in_their_own_slots(
        wh: DuckDBWarehouse) -> None:
    """Regression: a chunk was staged under its first source position alone, so the chunks
    of one end marker's removals (parts that share its position) replaced one another."""
    wh.stage(chunk("b1", 0, 10, [(f"u{i}", "s", "add", i + 1) for i in range(5)]))
    wh.merge("b1", 0, 10)
    removals = [(f"u{i}", "s", "remove", -1) for i in range(1, 5)]
    part = [(60, 0), (60, 0), (60, 1), (60, 1)]
    wh.stage(chunk("b2", 0, 60, removals[:2], stamps=part[:2]))
    wh.stage(chunk("b2", 0, 60, removals[2:], first_part=1, stamps=part[2:]))
    wh.stage(chunk("b2", 0, 60, removals[2:], first_part=1, stamps=part[2:]))  # again
    assert staged_count(wh) == 4
    assert wh.merge("b2", 0, 60) == LoadResult("b2", 0, rows_loaded=4, added=0, removed=4)
    assert wh.members() == [("s", "u0")]


def test_merge_applies_every_batch_of_the_partition_in_log_order(
        wh: DuckDBWarehouse, db: Path) -> None:
    """Regression: each (batch, partition) merged on its own at its end marker, so with A
    adding u, then B removing u, and B's end marker first, the warehouse kept (s, u)."""
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1), ("v", "s", "add", 2)]))
    wh.stage(chunk("B", 0, 20, [("u", "s", "remove", 1)]))
    wh.stage(chunk("B", 1, 21, [("x", "s", "add", 1)]))  # another partition: not merged
    assert wh.merge("B", 0, 30) == LoadResult("B", 0, rows_loaded=3, added=1, removed=0)
    assert member_rows(db) == [("s", "v", "A", 2)]  # each row keeps its own batch
    assert wh.watermark(0) == 30 and wh.watermark(1) is None
    wh.stage(chunk("A", 0, 35, [("u", "s", "add", 3)]))
    assert wh.merge("A", 0, 40) == LoadResult("A", 0, rows_loaded=1, added=1, removed=0)
    assert member_rows(db) == [("s", "u", "A", 3), ("s", "v", "A", 2)]
    assert staged_count(wh) == 1  # partition 1's
    assert counts(wh.ledger()) == [("A", 0, 1, 1, 0), ("B", 0, 3, 1, 0)]


def test_changes_at_or_below_the_watermark_are_not_staged_again(wh: DuckDBWarehouse) -> None:
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))
    wh.merge("B", 0, 30)  # B's marker merges A's rows too
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))  # A re-read after a restart
    assert staged_count(wh) == 0
    wh.stage(chunk("A", 0, 25, [("v", "s", "add", 2), ("w", "s", "add", 3)],
                   stamps=[(25, 0), (35, 0)]))
    assert staged_count(wh) == 1  # only the change after the watermark
    assert wh.merge("A", 0, 40).rows_loaded == 1
    assert wh.members() == [("s", "u"), ("s", "w")]


def test_merge_at_or_below_the_watermark_is_a_no_op(wh: DuckDBWarehouse, db: Path) -> None:
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))
    wh.merge("A", 0, 30)
    wh._transaction("stage behind the sink's back", lambda con: con.execute(
        "INSERT INTO staged_changes VALUES (1000, 20, 0, 0, 2, 'v', 's', 'add')"))
    assert wh.merge("B", 0, 30) == LoadResult("B", 0, 0, 0, 0, already_loaded=True)
    assert wh.merge("C", 0, 25).already_loaded
    assert member_rows(db) == [("s", "u", "A", 1)]
    assert counts(wh.ledger()) == [("A", 0, 1, 1, 0)]


def test_drop_staged_forgets_one_partition(wh: DuckDBWarehouse) -> None:
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))
    wh.stage(chunk("A", 1, 10, [("v", "s", "add", 1)]))
    wh.drop_staged(0)
    assert staged_count(wh) == 1
    wh.stage(chunk("A", 0, 12, [("w", "s", "add", 2)]))  # re-read from a later commit
    wh.merge("A", 0, 20)
    wh.merge("A", 1, 20)
    assert wh.members() == [("s", "v"), ("s", "w")]


def test_reset_segments_forgets_the_watermarks(wh: DuckDBWarehouse) -> None:
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))
    wh.merge("A", 0, 20)
    wh.reset_segments()
    assert (wh.members(), wh.ledger(), wh.watermark(0)) == ([], [], None)
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))  # a replay from the beginning
    assert wh.merge("A", 0, 20) == LoadResult("A", 0, 1, 1, 0)


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
    assert wh.merge("b1", 0, 9) == LoadResult("b1", 0, 1, 1, 0)


# -- property: merge == fold in log order --------------------------------------------------

USERS = [f"u{i}" for i in range(5)]
SEGMENTS = ["s0", "s1"]
# One item of a partition's change log: (batch, position, part, changes); changes None for
# the batch's end marker there.
Item = tuple[str, int, int, list[Change] | None]


def partition_of(user: str) -> int:
    return int(user[1:]) % 2  # records are keyed by user: one user, one partition


@st.composite
def partition_log(draw: st.DrawFn, partition: int) -> list[Item]:
    """1-3 batches interleaved on one partition: each some messages of changes (of 1-3
    parts at one position, as a replace end marker's removals), then its end marker."""
    users = [u for u in USERS if partition_of(u) == partition]
    change = st.tuples(st.sampled_from(users), st.sampled_from(SEGMENTS),
                       st.sampled_from(["add", "remove"]), st.booleans())
    pending: dict[str, list[list[list[tuple[str, str, str, bool]]] | None]] = {}
    for b in range(draw(st.integers(1, 3))):
        messages = draw(st.lists(st.lists(st.lists(change, min_size=1, max_size=4),
                                          min_size=1, max_size=3), max_size=3))
        pending[f"b{b}"] = [*messages, None]
    log: list[Item] = []
    seq = 0
    while pending:
        batch = draw(st.sampled_from(sorted(pending)))
        message = pending[batch].pop(0)
        if not pending[batch]:
            del pending[batch]
        position = 10 * (len(log) + 1)
        if message is None:
            log.append((batch, position, 0, None))
            continue
        for part, rows in enumerate(message):
            changes = []
            for user, segment, op, removed_at_end in rows:
                seq += 1
                changes.append((user, segment, op, -1 if removed_at_end else seq))
            log.append((batch, position, part, changes))
    return log


def chunks_of(data: st.DataObject, log: list[Item], partition: int) -> list[ChangeSet]:
    """Each batch's changes cut into chunks at random message boundaries, and at every end
    marker of the partition (as the change sink cuts them)."""
    out: list[ChangeSet] = []
    open_rows: dict[str, list[tuple[Change, tuple[int, int]]]] = {}

    def flush(batch: str) -> None:
        rows = open_rows.pop(batch, [])
        if rows:
            (pos, part) = rows[0][1]
            out.append(chunk(batch, partition, pos, [c for c, _ in rows], first_part=part,
                             stamps=[stamp for _, stamp in rows]))

    for batch, position, part, changes in log:
        if changes is None:
            for b in sorted(open_rows):
                flush(b)
            continue
        open_rows.setdefault(batch, []).extend((c, (position, part)) for c in changes)
        if data.draw(st.booleans()):
            flush(batch)
    return out


# 40 examples: each is ~30 staging and ~12 merge transactions on a fresh database file.
@settings(max_examples=40, deadline=None)
@given(data=st.data(), logs=st.tuples(partition_log(0), partition_log(1)))
def test_merge_equals_python_fold(data: st.DataObject, logs: tuple[list[Item], ...]) -> None:
    """Batches interleaved on each partition, chunks staged in any order before the end
    marker that needs them, some sent again, some partitions' staging dropped and staged
    again (a sink re-reading after a rebalance): the warehouse always equals the fold of
    each partition's changes in log order up to its last end marker merged."""
    chunks = {p: chunks_of(data, log, p) for p, log in enumerate(logs)}
    markers = [(p, batch, position) for p, log in enumerate(logs)
               for batch, position, _part, changes in log if changes is None]
    # The partitions' end markers in log order within each, in any order between them.
    by_partition = {p: [m for m in markers if m[0] == p] for p in (0, 1)}
    sequence: list[tuple[int, str, int]] = []
    while any(by_partition.values()):
        p = data.draw(st.sampled_from([q for q in (0, 1) if by_partition[q]]))
        sequence.append(by_partition[p].pop(0))

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "fold.duckdb"
        with DuckDBWarehouse(db) as wh:
            expected: dict[tuple[str, str], tuple[str, int]] = {}
            staged: dict[int, list[ChangeSet]] = {0: [], 1: []}
            applied = {0: -1, 1: -1}  # position up to which the model applied each log
            for p, batch, end in sequence:
                due = [c for c in chunks[p] if c.first_position <= end and c not in staged[p]]
                resent = data.draw(st.lists(st.sampled_from(staged[p]), max_size=2)
                                   ) if staged[p] else []
                for c in data.draw(st.permutations([*due, *resent])):
                    wh.stage(c)
                staged[p] += due
                if data.draw(st.integers(0, 4)) == 0:  # a rebalance: re-read from the start
                    wh.drop_staged(p)
                    for c in staged[p]:
                        wh.stage(c)
                before = set(expected)
                n = 0
                for of_batch, position, _part, changes in logs[p]:
                    if changes is None or not applied[p] < position <= end:
                        continue
                    for user, segment, op, seq in changes:
                        n += 1
                        if op == "add":
                            expected[(segment, user)] = (of_batch, seq)
                        else:
                            expected.pop((segment, user), None)
                applied[p] = end
                added, removed = len(set(expected) - before), len(before - set(expected))
                assert wh.merge(batch, p, end) == LoadResult(batch, p, n, added, removed)
                assert wh.merge(batch, p, end).already_loaded
                assert member_rows(db) == sorted(
                    (s, u, b, q) for (s, u), (b, q) in expected.items())
            assert staged_count(wh) == 0

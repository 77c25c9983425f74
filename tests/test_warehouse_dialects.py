"""Every warehouse dialect against the same rules: DuckDB, PostgreSQL (a real embedded
server) and Redshift's SQL run on PostgreSQL, plus what only a server dialect does:
concurrent merges, retries by SQLSTATE, and Redshift's exact COPY statements."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlglot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import errors as pgerrors

from connectors.warehouses import dialect_of, open_warehouse
from connectors.warehouses.base import LoadResult, Warehouse, WarehouseError
from connectors.warehouses.postgres import PostgresWarehouse, is_transient, redact
from connectors.warehouses.redshift import RedshiftWarehouse
from tests.postgres_server import fresh_database
from tests.test_warehouse import Item, chunk, chunks_of, partition_log
from tests.warehouse_dialects import PREFIX, RedshiftOnPostgres, member_rows, open_dialect

DIALECTS = ["duckdb", "postgres", "redshift"]


@pytest.fixture(params=DIALECTS)
def wh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Warehouse]:
    url = None
    if request.param != "duckdb":
        url = request.getfixturevalue("postgres_url")
    warehouse = open_dialect(request.param, tmp_path, url)
    try:
        yield warehouse
    finally:
        warehouse.close()


def counts(wh: Warehouse) -> list[tuple[str, int, int, int, int]]:
    return [(r.batch_id, r.partition, r.rows_loaded, r.added, r.removed) for r in wh.ledger()]


# -- the shared rules, on every dialect ------------------------------------------------


def test_staging_twice_and_merging_twice_apply_once(wh: Warehouse) -> None:
    first = chunk("b1", 0, 0, [("u1", "s1", "add", 1), ("u2", "s1", "add", 2)])
    wh.stage(first)
    wh.stage(chunk("b1", 0, 2, [("u3", "s2", "add", 3)]))
    wh.stage(first)  # re-sent after a crash
    assert not wh.is_loaded("b1", 0)
    assert wh.merge("b1", 0, 9) == LoadResult("b1", 0, 3, 3, 0)
    assert wh.merge("b1", 0, 9) == LoadResult("b1", 0, 3, 3, 0, already_loaded=True)
    assert wh.is_loaded("b1", 0)
    assert wh.members() == [("s1", "u1"), ("s1", "u2"), ("s2", "u3")]
    assert counts(wh) == [("b1", 0, 3, 3, 0)]


def test_two_batches_remove_readd_and_partitions(wh: Warehouse) -> None:
    wh.stage(chunk("b1", 0, 0, [("u1", "s1", "add", 1), ("u2", "s1", "add", 2),
                                ("u3", "s2", "add", 3)]))
    wh.stage(chunk("b1", 1, 0, [("u4", "s1", "add", 4)]))
    wh.merge("b1", 0, 9)
    wh.merge("b1", 1, 9)
    wh.stage(chunk("b2", 0, 10, [("u1", "s1", "remove", 1), ("u2", "s1", "add", 2),
                                 ("u5", "s2", "add", 3)]))
    wh.stage(chunk("b2", 1, 10, [("u4", "s1", "remove", -1)]))
    assert wh.merge("b2", 0, 19) == LoadResult("b2", 0, rows_loaded=3, added=1, removed=1)
    assert wh.merge("b2", 1, 19) == LoadResult("b2", 1, rows_loaded=1, added=0, removed=1)
    assert member_rows(wh) == [("s1", "u2", "b2", 2), ("s2", "u3", "b1", 3),
                               ("s2", "u5", "b2", 3)]
    assert wh.members("s2") == [("s2", "u3"), ("s2", "u5")]
    assert counts(wh) == [("b1", 0, 3, 3, 0), ("b1", 1, 1, 1, 0), ("b2", 0, 3, 1, 1),
                          ("b2", 1, 1, 0, 1)]


def test_merge_applies_every_batch_of_the_partition_in_log_order(wh: Warehouse) -> None:
    """A adds u, then B removes u, B's end marker first: u is gone, v stays A's."""
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1), ("v", "s", "add", 2)]))
    wh.stage(chunk("B", 0, 20, [("u", "s", "remove", 3)]))
    wh.stage(chunk("B", 1, 21, [("x", "s", "add", 4)]))  # another partition: not merged
    assert wh.merge("B", 0, 30) == LoadResult("B", 0, rows_loaded=3, added=1, removed=0)
    assert member_rows(wh) == [("s", "v", "A", 2)]
    assert wh.watermark(0) == 30 and wh.watermark(1) is None
    wh.stage(chunk("A", 0, 35, [("u", "s", "add", 5)]))
    assert wh.merge("A", 0, 40) == LoadResult("A", 0, rows_loaded=1, added=1, removed=0)
    assert member_rows(wh) == [("s", "u", "A", 5), ("s", "v", "A", 2)]
    assert wh.merge("B", 1, 30) == LoadResult("B", 1, 1, 1, 0)


def test_staging_a_chunk_keeps_another_batchs_chunk_inside_its_stamps(wh: Warehouse) -> None:
    """Regression, found by test_merge_equals_python_fold[postgres]: batch b0's chunk spans
    stamps 10..40 and b1's chunk at 30 lies inside that range (batches interleave on a
    partition); staging b0's chunk after b1's replaced b1's row as if it were its own."""
    wh.stage(chunk("b1", 1, 30, [("u1", "s1", "add", 3)]))
    wh.stage(chunk("b0", 1, 10, [("u1", "s0", "add", 1), ("u1", "s0", "add", 2),
                                 ("u1", "s0", "add", 4)], stamps=[(10, 0), (10, 1), (40, 0)]))
    wh.merge("b0", 1, 50)
    assert member_rows(wh) == [("s0", "u1", "b0", 4), ("s1", "u1", "b1", 3)]


def test_watermark_rules(wh: Warehouse) -> None:
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))
    wh.merge("B", 0, 30)  # B's marker merges A's rows too
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))  # A re-read after a restart
    wh.stage(chunk("A", 0, 25, [("v", "s", "add", 2), ("w", "s", "add", 3)],
                   stamps=[(25, 0), (35, 0)]))
    assert wh.merge("C", 0, 25).already_loaded  # at or below the watermark
    assert wh.merge("A", 0, 40).rows_loaded == 1  # only the change after the watermark
    assert wh.members() == [("s", "u"), ("s", "w")]


def test_replace_removals_spanning_chunks(wh: Warehouse) -> None:
    wh.stage(chunk("b1", 0, 10, [(f"u{i}", "s", "add", i + 1) for i in range(5)]))
    wh.merge("b1", 0, 10)
    removals = [(f"u{i}", "s", "remove", -1) for i in range(1, 5)]
    part = [(60, 0), (60, 0), (60, 1), (60, 1)]
    wh.stage(chunk("b2", 0, 60, removals[:2], stamps=part[:2]))
    wh.stage(chunk("b2", 0, 60, removals[2:], first_part=1, stamps=part[2:]))
    wh.stage(chunk("b2", 0, 60, removals[2:], first_part=1, stamps=part[2:]))  # again
    assert wh.merge("b2", 0, 60) == LoadResult("b2", 0, rows_loaded=4, added=0, removed=4)
    assert wh.members() == [("s", "u0")]


def test_drop_staged_and_reset(wh: Warehouse) -> None:
    wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))
    wh.stage(chunk("A", 1, 10, [("v", "s", "add", 1)]))
    wh.drop_staged(0)
    wh.stage(chunk("A", 0, 12, [("w", "s", "add", 2)]))  # re-read from a later commit
    wh.merge("A", 0, 20)
    wh.merge("A", 1, 20)
    assert wh.members() == [("s", "v"), ("s", "w")]
    wh.reset_segments()
    assert (wh.members(), wh.ledger(), wh.watermark(0)) == ([], [], None)
    wh.stage(chunk("A", 0, 12, [("w", "s", "add", 2)]))
    assert wh.merge("A", 0, 20) == LoadResult("A", 0, 1, 1, 0)


def test_upsert_batch_status(wh: Warehouse) -> None:
    wh.upsert_batch_status([{"batch_id": "b1", "status": "submitted",
                             "submitted_at": 1_700_000_000_123}])
    wh.upsert_batch_status([
        {"batch_id": "b1", "status": "published", "rows": 10, "rejected": 1, "partitions": 4,
         "submitted_at": 1_700_000_000_123, "published_at": 1_700_000_001_000,
         "detail": {"per_partition": [3, 3, 2, 2], "a": None}},
        {"batch_id": "b3", "status": "failed", "failed_at": 5, "error": "boom"},
        {"batch_id": "b3", "status": "failed", "failed_at": 6, "error": "bang"},
    ])
    assert wh.batch_status("b1") == {
        "batch_id": "b1", "status": "published", "rows": 10, "rejected": 1, "partitions": 4,
        "submitted_at": 1_700_000_000_123, "published_at": 1_700_000_001_000,
        "closed_at": None, "failed_at": None, "error": None,
        "detail": '{"a": null, "per_partition": [3, 3, 2, 2]}'}
    b3 = wh.batch_status("b3")
    assert b3 is not None and (b3["failed_at"], b3["error"]) == (6, "bang")
    assert wh.batch_status("nope") is None


# -- property: merge == fold in log order (DuckDB and PostgreSQL) ---------------------------
# Not Redshift: its COPY keeps no row order, so it orders a message's rows by seq, which the
# real log keeps rising (tests/test_warehouse.partition_log mixes seq -1 into messages).


@pytest.mark.parametrize("dialect", ["duckdb", "postgres"])
def test_merge_equals_python_fold(dialect: str, postgres_admin: str) -> None:
    @settings(max_examples=15, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data(), logs=st.tuples(partition_log(0), partition_log(1)))
    def check(data: st.DataObject, logs: tuple[list[Item], ...]) -> None:
        chunks = {p: chunks_of(data, log, p) for p, log in enumerate(logs)}
        markers = {p: [(batch, position) for batch, position, _part, changes in log
                       if changes is None] for p, log in enumerate(logs)}
        with tempfile.TemporaryDirectory() as tmp:
            url = fresh_database(postgres_admin) if dialect != "duckdb" else None
            wh = open_dialect(dialect, Path(tmp), url)
            try:
                expected: dict[tuple[str, str], tuple[str, int]] = {}
                applied = {0: -1, 1: -1}
                while any(markers.values()):
                    p = data.draw(st.sampled_from([q for q in (0, 1) if markers[q]]))
                    batch, end = markers[p].pop(0)
                    due = [c for c in chunks[p] if applied[p] < c.first_position <= end]
                    for c in data.draw(st.permutations(due)):
                        wh.stage(c)
                    for _b, position, _part, changes in logs[p]:
                        if changes is not None and applied[p] < position <= end:
                            for user, segment, op, seq in changes:
                                if op == "add":
                                    expected[(segment, user)] = (_b, seq)
                                else:
                                    expected.pop((segment, user), None)
                    applied[p] = end
                    wh.merge(batch, p, end)
                    assert member_rows(wh) == sorted(
                        (s, u, b, q) for (s, u), (b, q) in expected.items())
            finally:
                wh.close()

    check()


# -- PostgreSQL: concurrency, retries --------------------------------------------------------


def test_three_workers_merge_different_partitions_and_one_reruns(postgres_url: str) -> None:
    """Three warehouses (each its own pool, as three workers) merge partitions 0, 1, 2 at
    once, while a fourth re-runs partition 0's merge: every member lands once, one ledger
    row per (batch, partition)."""
    n = 2000
    chunks = {p: chunk("b", p, 10, [(f"u{p}-{i}", f"s{i % 7}", "add", i + 1)
                                    for i in range(n)]) for p in range(3)}
    workers = [PostgresWarehouse(postgres_url) for _ in range(4)]
    try:
        for p in range(3):
            workers[p].stage(chunks[p])
        barrier = threading.Barrier(4)
        results: dict[int, LoadResult] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                barrier.wait(timeout=30)
                results[i] = workers[i].merge("b", i % 3, 20)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 4
        rerun, first = results[3], results[0]
        assert {rerun.already_loaded, first.already_loaded} == {True, False}
        assert (rerun.added, first.added) == (n, n)  # the re-run reads the ledger's counts
        members = workers[0].members()
        assert len(members) == len(set(members)) == 3 * n
        assert [(r.batch_id, r.partition, r.added) for r in workers[0].ledger()] == [
            ("b", 0, n), ("b", 1, n), ("b", 2, n)]
    finally:
        for w in workers:
            w.close()


def test_concurrent_merges_of_one_partition_apply_once(postgres_url: str) -> None:
    """Two merges of one (batch, partition) at once, without the advisory lock: the ledger
    key is the guard (the loser's unique violation is retried and finds the ledger row)."""
    class Unlocked(PostgresWarehouse):
        def _lock_partition(self, cur: Any, partition: int) -> None:
            pass

    a, b = Unlocked(postgres_url), Unlocked(postgres_url)
    try:
        a.stage(chunk("b", 0, 10, [(f"u{i}", "s", "add", i + 1) for i in range(500)]))
        barrier = threading.Barrier(2)
        out: list[LoadResult] = []
        threads = [threading.Thread(target=lambda w=w: (barrier.wait(30),
                                                        out.append(w.merge("b", 0, 20))))
                   for w in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(r.already_loaded for r in out) == [False, True]
        assert len(a.members()) == 500 and len(a.ledger()) == 1
    finally:
        a.close()
        b.close()


def test_is_transient_by_sqlstate() -> None:
    assert is_transient(pgerrors.SerializationFailure())
    assert is_transient(pgerrors.DeadlockDetected())
    assert is_transient(pgerrors.AdminShutdown())
    assert is_transient(psycopg.OperationalError("server closed the connection"))
    assert not is_transient(pgerrors.UniqueViolation())
    assert not is_transient(pgerrors.UndefinedColumn("serialization deadlock"))
    assert not is_transient(ValueError("deadlock"))


def test_serialization_failure_is_retried_with_backoff(postgres_url: str) -> None:
    slept: list[float] = []
    with PostgresWarehouse(postgres_url, backoff_s=0.05, sleep=slept.append) as wh:
        tries = []

        def body(cur: Any) -> None:
            cur.execute("INSERT INTO merge_watermark VALUES (7, '00000000000000000001')")
            tries.append(1)
            if len(tries) < 3:
                cur.execute("SELECT 1/0")  # not transient: must not be retried
        with pytest.raises(WarehouseError, match="division by zero"):
            wh._transaction("t", body)
        assert len(tries) == 1 and slept == [] and wh.watermark(7) is None

        def flaky(cur: Any) -> None:
            cur.execute("INSERT INTO merge_watermark VALUES (8, '00000000000000000001')")
            tries.append(1)
            if len(tries) < 3:
                raise pgerrors.SerializationFailure("could not serialize")
        wh._transaction("t", flaky)
        assert len(slept) == 1 and 0.025 <= slept[0] <= 0.05  # one retry, rolled back first
        assert wh.watermark(8) == 1


def test_a_lost_connection_is_retried_on_a_fresh_one(postgres_url: str) -> None:
    with PostgresWarehouse(postgres_url, max_connections=1, sleep=lambda s: None) as wh:
        wh.stage(chunk("b", 0, 10, [("u", "s", "add", 1)]))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert wh.merge("b", 0, 20) == LoadResult("b", 0, 1, 1, 0)


def test_warehouse_url_registry(tmp_path: Path, postgres_url: str) -> None:
    assert dialect_of(str(tmp_path / "w.duckdb")) == "duckdb"
    assert dialect_of(f"duckdb://{tmp_path}/w.duckdb") == "duckdb"
    assert dialect_of("postgresql://u@h/db") == dialect_of("postgres://h/db") == "postgres"
    assert dialect_of("redshift://u@h:5439/db") == "redshift"
    with pytest.raises(ValueError, match="unknown scheme 'mysql'"):
        dialect_of("mysql://h/db")
    with open_warehouse(f"duckdb://{tmp_path}/w.duckdb") as duck:  # type: ignore[attr-defined]
        assert type(duck).__name__ == "DuckDBWarehouse"
        assert duck.location() == f"duckdb://{tmp_path}/w.duckdb#segment_members"
    pg = open_warehouse(postgres_url, max_connections=1)
    try:
        assert type(pg).__name__ == "PostgresWarehouse"
    finally:
        pg.close()
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u@h:5/db"


# -- Redshift: every statement parses, the COPYs exactly ----------------------------------


def test_redshift_statements_parse_and_copies_are_exact(tmp_path: Path,
                                                        postgres_url: str) -> None:
    wh = open_dialect("redshift", tmp_path, postgres_url)
    assert isinstance(wh, RedshiftOnPostgres)
    try:
        wh.stage(chunk("A", 0, 10, [("u", "s", "add", 1)]))
        wh.stage(chunk("B", 0, 20, [("u", "s", "remove", 2)]))
        wh.stage(chunk("B", 0, 25, [("v", "s", "add", 3)]))
        wh.stage(chunk("A", 0, 40, [("w", "s", "add", 4)]))  # after B's marker
        assert wh.merge("B", 0, 30) == LoadResult("B", 0, 3, 1, 0)
        wh.upsert_batch_status([{"batch_id": "B", "status": "closed", "closed_at": 5}])
        role = "IAM_ROLE 'arn:aws:iam::123456789012:role/loader'"
        lake = "s3://test-bucket/lake/audience/segment-changes"
        assert wh.copies == [
            f"COPY staged_load FROM '{lake}/batch=B/partition=0/_manifest.json' {role}"
            " MANIFEST FORMAT AS PARQUET",
            f"COPY staged_load FROM '{lake}/batch=A/partition=0/"
            f"part-00000000000000000010-00000.parquet' {role} FORMAT AS PARQUET",
        ]
        assert wh.members() == [("s", "v")]
        wh.stage(chunk("A", 0, 40, [("w", "s", "add", 4)]))
        assert wh.merge("A", 0, 50) == LoadResult("A", 0, 1, 1, 0)  # 10 not applied again
        assert wh.members() == [("s", "v"), ("s", "w")]
        assert len(wh.copies) == 3
        statements = wh.statements + wh.copies
        for statement in statements:
            tree = sqlglot.parse_one(statement.replace("%s", "1"), read="redshift")
            if statement != "LOCK load_ledger":  # sqlglot keeps LOCK as a raw command
                assert type(tree).__name__ != "Command", statement
    finally:
        wh.close()


class RedshiftAwaitingS3(RedshiftOnPostgres):
    """The S3 sink closes the partition in another worker: `exists` sees the local store,
    and the partition is closed there only after the merge polled `late` times."""

    def __init__(self, url: str, root: Path, late: int | None, **options: Any):
        self.polls: list[str] = []
        self.late = late
        self.pending: tuple[str, int, int] | None = None
        super().__init__(url, root, exists=self._exists_polled, **options)

    def _exists_polled(self, key: str) -> bool:
        self.polls.append(key)
        if self.pending and self.late is not None and len(self.polls) > self.late:
            batch, partition, end = self.pending
            self.sink.close_partition(batch, partition, self.partitions, end)
            self.pending = None
        return (self.root / key).exists()

    def merge(self, batch_id: str, partition: int, end_position: int) -> LoadResult:
        self.pending = (batch_id, partition, end_position)  # not closed yet
        return RedshiftWarehouse.merge(self, batch_id, partition, end_position)


def test_redshift_merge_waits_for_the_s3_sink_to_close_the_partition(
        tmp_path: Path, postgres_url: str) -> None:
    wh = RedshiftAwaitingS3(postgres_url, tmp_path / "s3", late=3)
    try:
        wh.stage(chunk("B", 0, 20, [("u", "s", "add", 1), ("v", "s", "add", 2)]))
        assert wh.merge("B", 0, 30) == LoadResult("B", 0, 2, 2, 0)
        manifest = f"{PREFIX}/batch=B/partition=0/_manifest.json"
        assert wh.polls[:4] == [manifest] * 4  # three misses, then there
        assert wh.members() == [("s", "u"), ("s", "v")]
    finally:
        wh.close()


def test_redshift_merge_gives_up_naming_what_the_s3_sink_never_wrote(
        tmp_path: Path, postgres_url: str) -> None:
    wh = RedshiftAwaitingS3(postgres_url, tmp_path / "s3", late=None, s3_wait_s=0.3)
    try:
        wh.stage(chunk("B", 0, 20, [("u", "s", "add", 1)]))
        with pytest.raises(WarehouseError, match=r"batch B partition 0: s3://test-bucket/lake/"
                           r"audience/segment-changes/batch=B/partition=0/_manifest.json is "
                           r"not there after 0.3s"):
            wh.merge("B", 0, 30)
        assert wh.ledger() == [] and wh.members() == []
    finally:
        wh.close()

"""Crash tests: real `streams` processes SIGKILLed at named crash points and at random
times during a 50k-row batch, then restarted. After the restart the batch must be closed
once, and every output (warehouse, S3 objects and manifests, load ledger, status table and
status topic) must hold each change exactly once: nothing lost, nothing doubled.

Kills come from `STREAMS_CRASH_AT` (streams/faults.py: the process SIGKILLs itself at a
crash point) or from the test (Popen + SIGKILL after a seeded random delay).

Every test runs on the embedded backend; a representative subset also runs on Kafka (a
Tansu broker of the test's own, tests/kafka_broker.py), with the same inputs and the same
checks: ids `kafka-...`, select them with `-k kafka`. On Kafka a run costs more (group joins
wait half the session timeout, a SIGKILLed member lingers until its session times out), so
the subset covers each kind of crash once: mid-import, between end markers, mid-processing
in the segments and the pipeline processors, a sink after a chunk and before its commit, a
replace batch, kills from outside at random times, and a separate worker killed, restarted
and stopped cleanly. Scale-out (workers sharing partitions) is in test_scale_out.py.

A further subset (ids `s3pg-...`) runs on the embedded log with S3 (moto's server, a bucket
of the test's own) and PostgreSQL (a database of the test's own) as the target, and checks
the bucket's objects and the database's tables the same way: kills inside the warehouse's
COPY and merge transactions (crash points `postgres.*`), and after S3 puts.

The Kafka subset runs on Kinesis too (ids `kinesis-...`, or `[kinesis]` for tests
parametrised by backend alone): kinesalite for the streams and the moto server for the lease
tables, a stream prefix and lease table of the test's own.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import duckdb
import psycopg
import pytest

from connectors.object_formats import decode_changes, extension
from connectors.object_store import ObjectStore, open_store
from connectors.s3_sink import parse_object_name
from connectors.status_sink import StatusTableSink
from connectors.warehouses.duckdb import DuckDBWarehouse
from streams.api import Input
from streams.outputs import OutputWriter
from streams.sink_task import SinkTask
from tests.aws_server import aws_env, make_bucket, moto_endpoint, unique_name
from tests.kafka_broker import GROUP_TIMEOUTS, fresh_kafka_bootstrap
from tests.kafka_broker import cli_env as kafka_cli_env
from tests.support import expected_members, random_rows, run_cli, write_csv
from topics.backends import open_log
from topics.backends.embedded.log import EmbeddedLog
from topics.codec import decode, encode
from topics.log import Log, RebalanceListener, TopicError, TopicPartition
from topics.spec import BATCH_STATUS, CHANGES, EVENTS, ROWS, SPECS

# fixtures, requested by name for Kafka and for S3 + PostgreSQL tests
__all__ = ["aws_env", "fresh_kafka_bootstrap", "moto_endpoint"]

N_ROWS = 50_000
PARTITIONS = 4
S3_PREFIX = ("audience", "segment-changes")
KILLED = -signal.SIGKILL

# Small chunks and messages so that crash points fall in the middle of a partition's work:
# ~8k changes per partition -> 4 chunks each (16 `after_chunk` passes per sink), 200 row
# messages (13 `import.publishing` passes), several processor checkpoints.
TUNING = {
    "STREAMS_CHUNK_ROWS": "2500",
    "STREAMS_MESSAGE_ROWS": "250",
    "STREAMS_CHECKPOINT_INTERVAL_S": "0.05",
}

# Every consumer group of an all-roles worker, with the topic it reads.
GROUPS = {
    "processor-segments": ROWS,
    "processor-pipeline": EVENTS,
    "sink-s3": CHANGES,
    "sink-warehouse": CHANGES,
    "sink-warehouse-status": BATCH_STATUS,
}


EMBEDDED, KAFKA, KINESIS = "embedded", "kafka", "kinesis"
# The embedded log delivering to S3 (moto's server) and PostgreSQL (the session's server).
S3_POSTGRES = "s3-postgres"


@dataclass(frozen=True)
class Target:
    """What a test's pipeline runs on: its data dir (spool, the embedded log, and by default
    the local object store and the DuckDB warehouse), its backend (embedded, or Kafka at
    `bootstrap`), and where given an S3 root (`s3_root`, with the AWS environment `aws`)
    and a warehouse URL (`warehouse`, PostgreSQL)."""

    data_dir: Path
    backend: str = EMBEDDED
    bootstrap: str = ""
    s3_root: str = ""
    warehouse: str = ""
    aws: dict[str, str] = field(default_factory=dict)
    kinesis: dict[str, str] = field(default_factory=dict)  # Kinesis: the process's env

    def env(self, crash_at: str = "") -> dict[str, str]:
        """Environment of a `streams` process on this target. STREAMS_CRASH_AT is always
        set, so that a value inherited by pytest cannot leak in."""
        backend = kafka_cli_env(self.bootstrap) if self.backend == KAFKA else self.kinesis
        outputs = {**self.aws, **({"STREAMS_S3_ROOT": self.s3_root} if self.s3_root else {}),
                   **({"STREAMS_WAREHOUSE": self.warehouse} if self.warehouse else {})}
        return {**TUNING, **backend, **outputs, "STREAMS_CRASH_AT": crash_at}

    def store(self) -> ObjectStore:
        """The S3 sink's objects (a bucket, or the local layout under the data dir)."""
        return open_store(self.s3_root or self.data_dir / "s3")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read of the warehouse (`?` placeholders), by the database's own client:
        the checks trust nothing of the pipeline's warehouse code."""
        if self.warehouse:
            with psycopg.connect(self.warehouse) as con:
                return con.execute(sql.replace("?", "%s"), list(params)).fetchall()
        con = duckdb.connect(str(self.data_dir / "warehouse.duckdb"), read_only=True)
        try:
            return con.execute(sql, list(params)).fetchall()
        finally:
            con.close()

    def members(self) -> list[tuple[str, str]]:
        return sorted(self.query("SELECT segment_id, user_id FROM segment_members"))

    def open_log(self) -> Log:
        if self.backend == KAFKA:
            return open_log(f"kafka://{self.bootstrap}", **GROUP_TIMEOUTS)
        if self.backend == KINESIS:
            return open_log("kinesis://", kinesis_prefix=self.kinesis["STREAMS_KINESIS_PREFIX"],
                            kinesis_lease_table=self.kinesis["STREAMS_KINESIS_LEASE_TABLE"],
                            kinesis_failover_ms=int(self.kinesis["STREAMS_KINESIS_FAILOVER_MS"]))
        return open_log(f"embedded://{(self.data_dir / 'log').resolve()}")

    @property
    def poll_interval(self) -> float:
        """Between reads of the log's groups and topics while waiting: a Kafka read opens
        clients and fetches (tens of ms of the 2 cores the pipeline needs)."""
        return 0.25 if self.backend in (KAFKA, KINESIS) else 0.05


@pytest.fixture
def backend() -> str:
    return EMBEDDED  # tests parametrised by "backend" override this


@pytest.fixture
def target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Target:
    if backend == KAFKA:  # a broker of the test's own: the pipeline's topic names are fixed
        return Target(tmp_path / "data", KAFKA, request.getfixturevalue("fresh_kafka_bootstrap"))
    if backend == KINESIS:  # streams and lease tables of the test's own, by name prefix
        env = {**request.getfixturevalue("kinesis_env"), "STREAMS_BACKEND": "kinesis",
               "STREAMS_KINESIS_PREFIX": unique_name("crash") + ".",
               "STREAMS_KINESIS_LEASE_TABLE": unique_name("leases"),
               # one shard per virtual partition: three workers can each hold leases
               "STREAMS_KINESIS_FAILOVER_MS": "3000", "STREAMS_KINESIS_SHARDS": "0"}
        return Target(tmp_path / "data", KINESIS, kinesis=env)
    if backend == S3_POSTGRES:  # a bucket and a database of the test's own
        aws = request.getfixturevalue("aws_env")
        return Target(tmp_path / "data", s3_root=f"s3://{make_bucket()}/out",
                      warehouse=request.getfixturevalue("postgres_url"), aws=aws)
    return Target(tmp_path / "data")


def on_backends(values: list[str], on_kafka: tuple[str, ...],
                on_s3_postgres: tuple[str, ...] = (),
                on_kinesis: tuple[str, ...] = ()) -> list[Any]:
    """(backend, value) cases: every value on the embedded backend (ids as they were before
    Kafka), the values in `on_kafka` on Kafka too (ids `kafka-<value>`), the values of
    `on_s3_postgres` (any, such as the warehouse's own crash points) with S3 + PostgreSQL
    as the target (ids `s3pg-<value>`), and those in `on_kinesis` on Kinesis (ids
    `kinesis-<value>`)."""
    unknown = (set(on_kafka) | set(on_kinesis)) - set(values)
    assert not unknown, f"Kafka/Kinesis cases that are not cases at all: {unknown}"
    return ([pytest.param(EMBEDDED, v, id=v) for v in values]
            + [pytest.param(KAFKA, v, id=f"kafka-{v}") for v in values if v in on_kafka]
            + [pytest.param(S3_POSTGRES, v, id=f"s3pg-{v}") for v in on_s3_postgres]
            + [pytest.param(KINESIS, v, id=f"kinesis-{v}") for v in values
               if v in on_kinesis])


BOTH_BACKENDS = [EMBEDDED, KAFKA]


@dataclass(frozen=True)
class Batch:
    path: Path
    mode: str
    rows: list[tuple[str, str, str]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Batch]:
    folder = tmp_path_factory.mktemp("crash-inputs")
    out = {}
    # The replace lists a fifth as many rows: ~6k removals a partition, so they go out in
    # two parts (REMOVALS_PER_MESSAGE), and the `between_removal_parts` points fall between.
    for name, seed, mode, n in (("first", 101, "add", N_ROWS),
                                ("second", 202, "replace", N_ROWS // 5)):
        rows = random_rows(n, users=20_000, segments=3, seed=seed)
        out[name] = Batch(write_csv(folder / f"{name}.csv", rows), mode, rows)
    return out


# -- processes --------------------------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts `python -m streams ARGS` in the background; kills leftovers at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, data_dir: Path, env: dict[str, str], name: str
              ) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "STREAMS_DATA_DIR": str(data_dir), **env}
        with open(tmp_path / f"{name}.out", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "streams", *args], stdout=out,
                                    stderr=subprocess.STDOUT, env=full_env,
                                    cwd=data_dir.parent)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def output_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.out").read_text(encoding="utf-8", errors="replace")


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- reading what the pipeline holds ---------------------------------------------------------


def statuses(target: Target) -> list[dict[str, Any]]:
    return json.loads(run_cli("status", "--json", data_dir=target.data_dir,
                              env=target.env()).stdout)


def status_of(all_statuses: list[dict[str, Any]], source: Path) -> dict[str, Any]:
    found = [s for s in all_statuses if s["source"] == str(source)]
    assert len(found) == 1, f"expected one batch from {source}, got {found}"
    return found[0]


def batch_is_closed(target: Target, batch_id: str) -> bool:
    return any(s["batch_id"] == batch_id and s["status"] == "closed"
               for s in statuses(target))


def group_lags(target: Target, groups: tuple[str, ...] = tuple(GROUPS)) -> dict[str, int | None]:
    """Messages after each group's committed positions, over all partitions of its topic
    (None: the group has not committed anything yet)."""
    log = target.open_log()
    try:
        lags: dict[str, int | None] = {}
        for group in groups:
            topic = GROUPS[group]
            positions = [gp for gp in log.group_positions(group) if gp.tp.topic == topic]
            lags[group] = (sum(gp.lag for gp in positions)
                           if len(positions) == len(log.partitions(topic)) else None)
        return lags
    finally:
        log.close()


def caught_up(target: Target, groups: tuple[str, ...] = tuple(GROUPS)) -> bool:
    return all(lag == 0 for lag in group_lags(target, groups).values())


def topic_values(target: Target, topic: str, batch_id: str) -> list[dict[str, Any]]:
    """Values of one batch on `topic`, partition by partition, in log order."""
    log = target.open_log()
    try:
        values = (decode(msg.value)[1] for partition in log.partitions(topic)
                  for msg in log.read(topic, partition))
        return [v for v in values if v["batch_id"] == batch_id]
    finally:
        log.close()


def events_of(target: Target, batch_id: str, kind: str) -> list[dict[str, Any]]:
    return [v for v in topic_values(target, EVENTS, batch_id) if v["kind"] == kind]


def status_snapshots(target: Target, batch_id: str) -> list[dict[str, Any]]:
    """Snapshots of one batch on `pipeline.batch-status`, in log order."""
    return [json.loads(v["json"]) for v in topic_values(target, BATCH_STATUS, batch_id)]


def batch_id_from_output(text: str) -> str:
    match = re.search(r"^batch\s+(\S+?):? ", text, re.MULTILINE)
    assert match, f"no batch id in output:\n{text}"
    return match.group(1)


# -- checks ------------------------------------------------------------------------------------


def check_s3(target: Target, batch_id: str, fmt: str, start: set[tuple[str, str]],
             end: set[tuple[str, str]], changes: int) -> None:
    """The manifest lists every part object once and nothing else is there; folding the
    objects in (partition, first position, first part, row) order turns `start` into `end`,
    and every row is a real change (an add of a non-member, a removal of a member)."""
    store = target.store()
    folder = "/".join((*S3_PREFIX, f"batch={batch_id}"))
    manifest = json.loads(store.get(f"{folder}/manifest.json"))
    assert manifest["batch_id"] == batch_id
    assert manifest["format"] == fmt
    urls = [e["url"] for e in manifest["entries"]]
    assert len(urls) == len(set(urls)), "an object is listed twice in the manifest"

    listed: dict[str, dict[str, Any]] = {}
    for entry in manifest["entries"]:
        # .../partition=<p>/<object>: its key under the batch folder
        key = "/".join([folder, *unquote(urlparse(entry["url"]).path).split("/")[-2:]])
        assert entry["url"] == store.url(key), entry["url"]
        assert store.exists(key), f"manifest lists a missing object {entry['url']}"
        listed[key] = entry
    allowed = {f"{folder}/manifest.json"} | {
        f"{folder}/partition={p}/_manifest.json" for p in range(PARTITIONS)}
    stored = set(store.list(folder + "/"))  # (unfinished local puts are not listed)
    stray = sorted(stored - set(listed) - allowed)
    assert not stray, f"objects in the batch folder that the manifest does not list: {stray}"
    assert allowed <= stored, f"missing {sorted(allowed - stored)}"

    # Per-partition manifests together list exactly what the batch manifest lists.
    per_partition = []
    for p in range(PARTITIONS):
        part = json.loads(store.get(f"{folder}/partition={p}/_manifest.json"))
        per_partition += [e["url"] for e in part["entries"]]
    assert sorted(per_partition) == sorted(urls)

    objects = []
    for key, entry in listed.items():
        directory, _, filename = key.rpartition("/")
        match = re.fullmatch(r"partition=(\d+)", directory.rpartition("/")[2])
        assert match, key
        assert filename.endswith(extension(fmt)), f"unexpected object name {filename}"
        try:  # part-<position key>-<part>: 20 digits, or w<width><digits> (Kinesis)
            first, part_no = parse_object_name(filename)
        except ValueError:
            raise AssertionError(f"unexpected object name {filename}") from None
        objects.append((int(match.group(1)), first, part_no, key, entry))
    objects.sort()

    state = set(start)
    total = 0
    for partition, _first, _part, key, entry in objects:
        data = store.get(key)
        assert entry["meta"]["content_length"] == len(data)
        rows = decode_changes(data, fmt)
        assert entry["meta"]["record_count"] == len(rows)
        total += len(rows)
        for row in rows:
            assert row["batch_id"] == batch_id and row["partition"] == partition, row
            member = (row["segment_id"], row["user_id"])
            if row["op"] == "add":
                assert member not in state, f"{key}: add of a member (doubled?) {row}"
                state.add(member)
            else:
                assert row["op"] == "remove", row
                assert member in state, f"{key}: removal of a non-member (doubled?) {row}"
                state.discard(member)
    assert manifest["record_count"] == total
    assert total == changes, f"objects hold {total} changes, the batch status says {changes}"
    assert state == end, (f"S3 changes fold to {len(state)} members, expected {len(end)}: "
                          f"{len(state - end)} extra, {len(end - state)} missing")


def epoch_ms(when: datetime) -> int:
    """A warehouse TIMESTAMP (naive UTC) in epoch milliseconds."""
    return (when - datetime(1970, 1, 1)) // timedelta(milliseconds=1)


def check_warehouse(target: Target, status: dict[str, Any], start: set[tuple[str, str]],
                    end: set[tuple[str, str]], rows: int) -> None:
    batch_id = status["batch_id"]
    ledger = target.query("SELECT partition, rows_loaded, added, removed FROM load_ledger"
                          " WHERE batch_id = ? ORDER BY partition", [batch_id])
    stored = [(s, epoch_ms(closed), n, rejected) for s, closed, n, rejected in target.query(
        "SELECT status, closed_at, rows, rejected FROM batch_status WHERE batch_id = ?",
        [batch_id])]
    assert [r[0] for r in ledger] == list(range(PARTITIONS)), \
        f"load ledger of {batch_id}: {ledger}; expected one row per partition"
    assert sum(r[1] for r in ledger) == status["changes_total"]
    assert sum(r[2] for r in ledger) - sum(r[3] for r in ledger) == len(end) - len(start)
    # (DuckDB stages in a TEMP table of the sink's connection: nothing of it outlives a
    # load; PostgreSQL in a table, which a closed batch leaves empty)
    if target.warehouse:
        assert target.query("SELECT count(*) FROM staged_changes") == [(0,)]
    assert len(stored) == 1, f"warehouse batch_status rows for {batch_id}: {stored}"
    assert stored[0] == ("closed", status["closed_at"], rows, 0), \
        f"warehouse batch_status {stored[0]} != CLI status {status['closed_at']}"


def check_closed_once(target: Target, batch_id: str, closed_at: int) -> None:
    """Snapshots may be re-emitted after a crash (outputs before changelog), but every closed
    snapshot of the batch carries the one time it closed."""
    snapshots = status_snapshots(target, batch_id)
    statuses_seen = [s["status"] for s in snapshots]
    assert "closed" in statuses_seen, f"no closed snapshot of {batch_id}: {statuses_seen}"
    assert "failed" not in statuses_seen, statuses_seen
    assert {s["closed_at"] for s in snapshots if s["status"] == "closed"} == {closed_at}


def verify(target: Target, history: list[Batch], fmt: str = "parquet") -> None:
    """Every batch of `history` (in order) is closed once and delivered exactly once."""
    data_dir = target.data_dir
    all_statuses = statuses(target)
    for i, batch in enumerate(history):
        start = expected_members((b.mode, b.rows) for b in history[:i])
        end = expected_members((b.mode, b.rows) for b in history[: i + 1])
        status = status_of(all_statuses, batch.path)
        changes = sum(status["applied"].values())
        status["changes_total"] = changes
        assert status["status"] == "closed", status
        assert status["closed_at"] is not None
        assert status["rejected"] == 0
        assert status["rows"] == len(batch.rows) - status["rejected"]
        assert sum(status["partition_counts"]) == status["rows"]
        assert status["error"] == ""
        check_s3(target, status["batch_id"], fmt, start, end, changes)
        check_warehouse(target, status, start, end, len(batch.rows))
        check_closed_once(target, status["batch_id"], status["closed_at"])
    members = target.members()
    assert len(members) == len(set(members)), "duplicate (segment, user) rows in the warehouse"
    expected = sorted(expected_members((b.mode, b.rows) for b in history))
    assert members == expected, (f"warehouse holds {len(members)} members, expected "
                                 f"{len(expected)}: {len(set(members) - set(expected))} "
                                 f"extra, {len(set(expected) - set(members))} missing")
    # and the project's own checker agrees: the source folded from the start equals the
    # restored state, the warehouse and the fold of the S3 objects
    checked = run_cli("verify", data_dir=data_dir, env=target.env(), check=False)
    assert checked.returncode == 0 and "no differences" in checked.stdout, (
        checked.stdout + checked.stderr)


# -- 1. crash points ---------------------------------------------------------------------------

CRASH_POINTS = [
    "import.publishing",  # mid-import: after the first 16 row messages
    "import.publishing:8",
    "import.before_end_markers",
    "import.end_marker:2",  # between the 2nd and the 3rd end marker
    "segments.after_outputs",  # mid-processing: rows applied, end markers not yet
    "segments.after_changelog",
    "segments.inside_changelog",  # a checkpoint's first part durable, the rest not (torn)
    "segments.inside_changelog:3",
    "pipeline.after_outputs",
    "pipeline.after_changelog",
    "sink-s3.after_chunk:7",  # a sink wrote a chunk, before anything committed
    "sink-warehouse.after_chunk:8",
    "sink-s3.after_close",  # after a partition's manifest, before sink_committed
    "sink-s3.after_close:4",  # the last partition: after the batch manifest
    "sink-warehouse.after_close:2",  # after a merge, before sink_committed
    "sink-warehouse.after_close:4",  # the last merge
]
# One of each kind on Kafka (the replace batch and the random kills below add theirs). A
# processor killed after its outputs (`*.after_outputs`) re-emits them; where a partition
# then ends in duplicates, a sink on Tansu (no commit metadata) must still commit past them.
KAFKA_CRASH_POINTS = ("import.publishing:8", "import.end_marker:2", "segments.after_outputs",
                      "segments.inside_changelog", "pipeline.after_outputs",
                      "sink-warehouse.after_chunk:8")
KINESIS_CRASH_POINTS = KAFKA_CRASH_POINTS  # the same kinds of crash as on Kafka
# With S3 (moto) and PostgreSQL as the target: the kills inside the warehouse's own
# transactions, and after S3 puts (the partition ~29k changes: 3 chunks, 12 in all).
S3_POSTGRES_CRASH_POINTS = (
    "postgres.inside_copy:5",  # mid-COPY: half a chunk's rows sent, nothing committed
    "postgres.inside_merge:2",  # mid-merge: members, ledger, watermark written, not committed
    "sink-s3.after_chunk:7",  # after an S3 put, before the sink committed anything
    "sink-s3.after_close:4",  # after the batch manifest's put, before sink_committed
)


# Crash points of the sinks (and of the warehouse they load), which `streams run` runs in a
# child process.
CHILD_POINTS = ("sink-", "postgres.")


def assert_killed(crashed: subprocess.CompletedProcess[str], crash_at: str) -> None:
    """`streams run` runs the sinks in a child process: a sink crash point kills the child,
    and the parent then stops with an error saying so; any other point kills the parent."""
    detail = (f"STREAMS_CRASH_AT={crash_at}: exit {crashed.returncode}\n"
              f"stdout:\n{crashed.stdout}\nstderr:\n{crashed.stderr}")
    if crash_at.startswith(CHILD_POINTS):
        assert crashed.returncode == 1, detail
        assert "worker process was killed by SIGKILL" in crashed.stderr, detail
        assert "run the same command again" in crashed.stderr, detail
    else:
        assert crashed.returncode == KILLED, detail


def crash_then_rerun(args: tuple[str, ...], target: Target, crash_at: str) -> None:
    crashed = run_cli(*args, data_dir=target.data_dir, env=target.env(crash_at), check=False)
    assert_killed(crashed, crash_at)
    rerun = run_cli(*args, data_dir=target.data_dir, env=target.env())
    assert re.search(r"^status\s+closed$", rerun.stdout, re.MULTILINE), rerun.stdout


@pytest.mark.parametrize(("backend", "crash_at"), on_backends(
    CRASH_POINTS, KAFKA_CRASH_POINTS, S3_POSTGRES_CRASH_POINTS, KINESIS_CRASH_POINTS))
def test_run_killed_at_crash_point_then_rerun_delivers_once(
        target: Target, inputs: dict[str, Batch], crash_at: str) -> None:
    batch = inputs["first"]
    crash_then_rerun(("run", "-q", str(batch.path)), target, crash_at)
    verify(target, [batch])


@pytest.mark.parametrize("crash_at", ["sink-s3.after_chunk:5"])
def test_run_killed_with_jsonl_objects(target: Target, inputs: dict[str, Batch],
                                       crash_at: str) -> None:
    batch = inputs["first"]
    crash_then_rerun(("--s3-format", "jsonl", "run", "-q", str(batch.path)), target, crash_at)
    verify(target, [batch], fmt="jsonl")


@pytest.mark.parametrize(("backend", "crash_at"), on_backends([
    "import.end_marker:2",  # end markers of partitions 0 and 1 are sent twice
    "segments.after_outputs:2",  # the checkpoint that holds the end-marker removals
    "segments.between_outputs",  # a replace's first removal part durable, the rest not
    "sink-s3.between_removal_parts:3",
    "sink-warehouse.between_removal_parts",
    "sink-warehouse.after_close:3",
], on_kafka=("segments.after_outputs:2", "segments.between_outputs"),
    on_kinesis=("segments.after_outputs:2", "segments.between_outputs"),
    # the merge of the replace's removals (in parts) killed before its commit
    on_s3_postgres=("postgres.inside_merge:3",)))
def test_replace_batch_killed_then_rerun_removes_once(
        target: Target, inputs: dict[str, Batch], crash_at: str) -> None:
    first, second = inputs["first"], inputs["second"]
    run_cli("run", "-q", str(first.path), data_dir=target.data_dir, env=target.env())
    crash_then_rerun(("run", "-q", "--mode", "replace", str(second.path)), target, crash_at)
    verify(target, [first, second])


def test_run_killed_in_processor_then_in_sink_then_rerun_delivers_once(
        target: Target, inputs: dict[str, Batch]) -> None:
    """Two kills in a row, as a random kill lands them. The 1st (segments.after_outputs)
    makes the rerun's processor re-emit its first checkpoint: partitions 0-2 of the changes
    topic hold every change and the end marker twice. In the 2nd run the sink's polls end
    inside the duplicates, so it commits a skipped duplicate (one whose stamp is below the
    end marker it already applied); it is killed at a later chunk (sink-s3.after_chunk:7,
    partition 2) before committing past the duplicates. The 3rd run must resume after that
    duplicate without taking the rest of the duplicates for a new run of the batch."""
    batch = inputs["first"]
    args = ("run", "-q", str(batch.path))
    for crash_at in ("segments.after_outputs", "sink-s3.after_chunk:7"):
        crashed = run_cli(*args, data_dir=target.data_dir, env=target.env(crash_at),
                          check=False)
        assert_killed(crashed, crash_at)
    rerun = run_cli(*args, data_dir=target.data_dir, env=target.env(), check=False)
    assert rerun.returncode == 0, f"stdout:\n{rerun.stdout}\nstderr:\n{rerun.stderr}"
    verify(target, [batch])


@pytest.mark.parametrize(("backend", "crash_at"), on_backends([
    "sink-s3.after_boundary_poll",  # a poll past the first batch's end, into the second's
    "sink-warehouse.after_boundary_poll",
], on_kafka=("sink-warehouse.after_boundary_poll",),
    on_kinesis=("sink-warehouse.after_boundary_poll",)))
def test_sink_killed_after_a_poll_across_two_batches_then_restarted_delivers_once(
        tmp_path: Path, target: Target, inputs: dict[str, Batch], crash_at: str,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """Both batches are on the log before the worker starts, so a sink's poll takes the end
    of the first and the start of the second on one partition: the commit it makes there
    must carry the stamp as of the committed position, or the restarted sink skips the
    second batch's first message and fails it on the count."""
    first, second = inputs["first"], inputs["second"]
    for batch in (first, second):
        run_cli("import", "-q", "--mode", batch.mode, str(batch.path),
                data_dir=target.data_dir, env=target.env())
    crashed = spawn("worker", data_dir=target.data_dir, env=target.env(crash_at), name="w1")
    assert crashed.wait(timeout=300) == KILLED, output_of(tmp_path, "w1")
    worker = spawn("worker", data_dir=target.data_dir, env=target.env(), name="w2")
    try:
        wait_for(lambda: all(batch_is_closed_from(target, b.path) for b in (first, second))
                 or worker.poll() is not None, 300, "both batches to close",
                 interval=target.poll_interval)
        wait_for(lambda: caught_up(target) or worker.poll() is not None, 120,
                 "the worker to catch up", interval=target.poll_interval)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, output_of(tmp_path, "w2")
    verify(target, [first, second])


def batch_is_closed_from(target: Target, source: Path) -> bool:
    return any(s["source"] == str(source) and s["status"] == "closed" for s in statuses(target))


# -- 2. kills from outside at random points of progress ---------------------------------------

# A kill from outside lands on a condition, never on a delay: each attempt picks a random
# topic (the import's rows, the processor's changes, the pipeline's events) and a random
# share of the messages a whole run writes there (learnt once from a clean run: the same
# input writes the same messages), and SIGKILLs the run the moment the topic holds that many
# more messages than when the attempt began. However fast the machine, the first attempt
# (the whole batch to do) gets there; later ones may finish first, which is fine.
PROGRESS_TOPICS = (ROWS, CHANGES, EVENTS)


def messages_on(target: Target, topic: str) -> int:
    log = target.open_log()
    try:
        return sum(info.messages for info in log.describe(topic))
    except TopicError:  # the run has not created its topics yet
        return 0
    finally:
        log.close()


@pytest.fixture(scope="module")
def clean_run_messages(tmp_path_factory: pytest.TempPathFactory,
                       inputs: dict[str, Batch]) -> dict[str, int]:
    """Messages per progress topic after one clean run of the first batch (embedded)."""
    reference = Target(tmp_path_factory.mktemp("reference") / "data")
    run_cli("run", "-q", str(inputs["first"].path), data_dir=reference.data_dir,
            env=reference.env())
    return {topic: messages_on(reference, topic) for topic in PROGRESS_TOPICS}


@pytest.mark.parametrize("backend", [*BOTH_BACKENDS, KINESIS])
def test_run_killed_from_outside_at_random_times(
        tmp_path: Path, target: Target, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]],
        clean_run_messages: dict[str, int]) -> None:
    rng = random.Random(8_675_309)
    batch = inputs["first"]
    outcomes = []
    for attempt in range(3):
        topic = rng.choice(PROGRESS_TOPICS)
        share = rng.uniform(0.1, 0.7)  # room for the kill before the run ends
        name = f"run-{attempt}"
        before = messages_on(target, topic) if attempt else 0
        goal = before + max(1, int(share * clean_run_messages[topic]))
        proc = spawn("run", "-q", str(batch.path), data_dir=target.data_dir, env=target.env(),
                     name=name)
        wait_for(lambda proc=proc, topic=topic, goal=goal: proc.poll() is not None
                 or messages_on(target, topic) >= goal, 120,
                 f"{name} to write {goal} messages to {topic}", interval=target.poll_interval)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode in (0, KILLED), output_of(tmp_path, name)
        outcomes.append((topic, round(share, 2), proc.returncode))
    assert outcomes[0][2] == KILLED, f"the first attempt finished before its kill: {outcomes}"
    final = run_cli("run", "-q", str(batch.path), data_dir=target.data_dir, env=target.env())
    assert re.search(r"^status\s+closed$|nothing changed", final.stdout, re.MULTILINE), \
        final.stdout
    verify(target, [batch])


# -- 3. a separate worker, killed and restarted, then stopped cleanly --------------------------


@pytest.mark.parametrize("backend", [*BOTH_BACKENDS, KINESIS])
def test_worker_killed_at_checkpoint_restarted_and_stopped_cleanly(
        tmp_path: Path, target: Target, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    data_dir = target.data_dir
    batch = inputs["first"]
    imported = run_cli("import", "-q", str(batch.path), data_dir=data_dir, env=target.env())
    batch_id = batch_id_from_output(imported.stdout)

    first = spawn("worker", data_dir=data_dir, env=target.env("segments.after_changelog"),
                  name="worker-1")
    assert first.wait(timeout=120) == KILLED, output_of(tmp_path, "worker-1")
    assert not batch_is_closed(target, batch_id)

    second = spawn("worker", data_dir=data_dir, env=target.env(), name="worker-2")
    wait_for(lambda: batch_is_closed(target, batch_id), 180, f"batch {batch_id} to close",
             interval=0.2)
    # Closed in the status view (which folds events the pipeline processor may not have
    # seen yet); let the worker also fold them and deliver the last snapshots.
    delivery = ("processor-pipeline", "sink-s3", "sink-warehouse", "sink-warehouse-status")
    wait_for(lambda: caught_up(target, delivery), 60, f"groups {delivery} to catch up",
             interval=target.poll_interval)
    assert second.poll() is None, output_of(tmp_path, "worker-2")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=10) == 0, output_of(tmp_path, "worker-2")
    assert "worker stopped cleanly" in output_of(tmp_path, "worker-2")
    verify(target, [batch])
    lags = group_lags(target)
    assert all(lag == 0 for lag in lags.values()), (
        f"a cleanly stopped worker left consumed messages uncommitted: {lags} (a restart "
        "re-reads them, and monitoring reports a lag that never drains)")


# -- 4. double-fired trigger -------------------------------------------------------------------


def test_same_file_twice_changes_nothing_and_reused_batch_id_is_refused(
        target: Target, inputs: dict[str, Batch]) -> None:
    data_dir = target.data_dir
    first, other = inputs["first"], inputs["second"]
    args = ("run", "-q", "--batch-id", "crash-dup-1", str(first.path))
    run_cli(*args, data_dir=data_dir, env=target.env())
    snapshots = len(status_snapshots(target, "crash-dup-1"))
    again = run_cli(*args, data_dir=data_dir, env=target.env())
    assert "nothing changed" in again.stdout, again.stdout
    assert len(status_snapshots(target, "crash-dup-1")) == snapshots

    refused = run_cli("import", "-q", "--batch-id", "crash-dup-1", str(other.path),
                      data_dir=data_dir, env=target.env(), check=False)
    assert refused.returncode != 0
    assert "crash-dup-1" in refused.stdout + refused.stderr, refused.stderr
    verify(target, [first])


# -- 5. kills in the last steps of a batch, and what a kill leaves on disk ---------------------


def kill_after_sinks_then_pipeline_at_close(
        target: Target, batch: Batch, spawn: Callable[..., subprocess.Popen[bytes]]) -> str:
    """Leaves `target` as a `streams run` SIGKILLed in the last steps of a batch: every
    sink has committed every partition, and the pipeline processor has folded those events
    and flushed the closed snapshot, but died before its changelog and offsets (crash point
    `pipeline.after_outputs`) and before the status sink saw the snapshot. In one all-roles
    process a random kill falls there as easily as anywhere; role workers make it
    deterministic. Returns the batch id."""
    data_dir = target.data_dir
    imported = run_cli("import", "-q", str(batch.path), data_dir=data_dir, env=target.env())
    batch_id = batch_id_from_output(imported.stdout)
    sinks = spawn("worker", "--roles", "segments,s3,warehouse", data_dir=data_dir,
                  env=target.env(), name="sinks")
    wait_for(lambda: len(events_of(target, batch_id, "sink_committed")) >= 2 * PARTITIONS
             or sinks.poll() is not None, 120, "every sink to commit every partition",
             interval=0.1)
    sinks.send_signal(signal.SIGKILL)
    assert sinks.wait(timeout=30) == KILLED
    pipeline = spawn("worker", "--roles", "pipeline", data_dir=data_dir,
                     env=target.env("pipeline.after_outputs"), name="pipeline")
    assert pipeline.wait(timeout=60) == KILLED
    assert any(s["status"] == "closed" for s in status_snapshots(target, batch_id))
    return batch_id


def test_run_again_after_kill_between_last_sink_commit_and_status_delivery(
        target: Target, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """Running the same `streams run` again must close the batch everywhere: in the
    pipeline's own table and offsets and in the warehouse's batch_status table, not only in
    the status view that folds the events no processor has applied yet."""
    batch = inputs["first"]
    kill_after_sinks_then_pipeline_at_close(target, batch, spawn)
    run_cli("run", "-q", str(batch.path), data_dir=target.data_dir, env=target.env())
    verify(target, [batch])


class RecordingWarehouse(DuckDBWarehouse):
    """A scratch warehouse that records a batch's stored status after every upsert."""

    def __init__(self, path: Path, batch_id: str):
        super().__init__(path)
        self.batch_id = batch_id
        self.seen: list[str] = []

    def upsert_batch_status(self, rows: list[dict[str, Any]]) -> None:
        super().upsert_batch_status(rows)
        row = self.batch_status(self.batch_id)
        if row is not None:
            self.seen.append(row["status"])


def statuses_a_status_sink_stores(target: Target, batch_id: str, scratch: Path) -> list[str]:
    """Feeds `pipeline.batch-status` as it now stands through the production status sink
    (SinkTask + StatusTableSink + DuckDB upsert, in a fresh consumer group and a scratch
    database): the sequence of statuses a dashboard would have read for the batch."""
    log = target.open_log()
    warehouse = RecordingWarehouse(scratch, batch_id)
    task = SinkTask(log, StatusTableSink(warehouse), OutputWriter(log, log.producer()),
                    "test-status-replay", "test-status-replay")
    try:
        idle = 0
        for _round in range(1000):  # bounded: the topic holds a few dozen snapshots
            idle = 0 if task.step(timeout_s=0.05) else idle + 1
            if idle >= 3 and task.consumer.assignment():
                break
        else:
            raise AssertionError("the status sink did not catch up")
        return warehouse.seen
    finally:
        task.close()
        warehouse.close()
        log.close()


def test_status_table_never_reopens_a_closed_batch_after_a_pipeline_crash(
        tmp_path: Path, target: Target, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """The pipeline processor killed after flushing the closed snapshot but before its
    changelog re-emits, on restart, every snapshot since its last checkpoint: submitted,
    published, ..., closed again. The warehouse's batch_status (and any dashboard or trigger
    on the status topic) must not see the batch go from closed back to submitted/published
    and close a second time."""
    batch = inputs["first"]
    batch_id = kill_after_sinks_then_pipeline_at_close(target, batch, spawn)
    # Restart the pipeline processor alone; the status topic is then checked through the
    # production status sink below, whatever a warehouse worker would have read meanwhile.
    worker = spawn("worker", "--roles", "pipeline", data_dir=target.data_dir, env=target.env(),
                   name="pipeline-2")
    wait_for(lambda: caught_up(target, ("processor-pipeline",)), 60,
             "the pipeline processor to catch up", interval=0.1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, output_of(tmp_path, "pipeline-2")
    assert batch_is_closed(target, batch_id)

    seen = statuses_a_status_sink_stores(target, batch_id, tmp_path / "scratch.duckdb")
    closed = seen.index("closed")
    assert all(s == "closed" for s in seen[closed:]), (
        f"the warehouse batch_status of {batch_id} left 'closed' after it closed: {seen}")


def test_killed_import_leaves_no_spool_file_behind(tmp_path: Path, target: Target) -> None:
    """The importer spools the whole file before publishing; a SIGKILLed import must not
    leave that copy on disk forever once the batch has been finished by a rerun."""
    data_dir = target.data_dir
    path = write_csv(tmp_path / "small.csv", random_rows(20_000, users=5_000, segments=3,
                                                         seed=7))
    args = ("run", "-q", str(path))
    crashed = run_cli(*args, data_dir=data_dir, env=target.env("import.publishing"),
                      check=False)
    assert crashed.returncode == KILLED, crashed.stderr
    run_cli(*args, data_dir=data_dir, env=target.env())
    left = sorted(p.name for p in (data_dir / "spool").iterdir())
    assert left == [], f"spool files left behind by the killed import: {left}"


# -- 6. a sink on a log that keeps no commit metadata (Tansu) ----------------------------------


class NoCommitMetadata:
    """A consumer that drops commit metadata, as Tansu does; the rest is the wrapped one's."""

    def __init__(self, consumer: Any):
        self._consumer = consumer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def commit(self, positions: dict[TopicPartition, int],
               metadata: dict[TopicPartition, str] | None = None) -> None:
        self._consumer.commit(positions)

    def committed_metadata(self, tp: TopicPartition) -> str:
        return ""


class NoCommitMetadataLog(EmbeddedLog):
    def consumer(self, group: str, topics: Sequence[str], listener: RebalanceListener,
                 member: str = "") -> Any:
        return NoCommitMetadata(super().consumer(group, topics, listener, member))


class RecordingSink:
    """Stamps values by their source position, as the status sink does; records them."""

    name = "recording"
    topic = BATCH_STATUS

    def __init__(self) -> None:
        self.applied: list[int] = []

    def stamp(self, record: Input) -> tuple[int, int]:
        return record.value["source_position"], 0

    def process(self, record: Input) -> list[Any]:
        self.applied.append(record.value["source_position"])
        return []

    def idle(self, partition: int) -> bool:
        return True

    def reset(self, partition: int) -> None:
        pass


def drain(task: SinkTask) -> None:
    idle = 0
    for _round in range(200):  # bounded: a handful of messages
        idle = 0 if task.step(timeout_s=0.01) else idle + 1
        if idle >= 3 and task.consumer.assignment():
            return
    raise AssertionError("the sink did not catch up")


def test_sink_commits_past_re_emitted_duplicates_without_commit_metadata(
        tmp_path: Path) -> None:
    """Regression, found by the Kafka crash tests (the replace batch killed at
    `segments.after_outputs:2`): a processor killed between its outputs and its changelog
    re-emits them, so a partition may end with duplicates only. Where commit metadata is
    lost (Tansu) a sink commits only messages whose stamp is the highest it has seen; it
    used to commit none of the duplicates, so the group's lag never drained and the rerun
    `streams run` failed waiting for its sinks. The last duplicate carries the highest stamp
    (a copy of the last value applied): committing it is safe, and a restarted sink resumes
    after it."""
    log = NoCommitMetadataLog(tmp_path / "log")
    log.ensure_topics([SPECS[BATCH_STATUS]])
    producer = log.producer()

    def send(*source_positions: int) -> None:
        for position in source_positions:
            producer.send(BATCH_STATUS, 0, encode("BatchStatus", {
                "batch_id": "b", "status": "published", "json": "{}",
                "source_position": position}))
        producer.flush()

    def applied_by_a_sink(member: str) -> list[int]:
        sink = RecordingSink()
        task = SinkTask(log, sink, OutputWriter(log, producer), "recording", member)
        try:
            drain(task)
        finally:
            task.close()
        return sink.applied

    send(10, 20, 30, 10, 20, 30)  # the outputs, then the same re-emitted after a crash
    assert applied_by_a_sink("m1") == [10, 20, 30]
    lag = {gp.tp.partition: gp.lag for gp in log.group_positions("recording")}
    assert lag == {0: 0, 1: 0}, f"duplicates left uncommitted: lag {lag}"

    send(40)
    assert applied_by_a_sink("m2") == [40], "a restarted sink applied again what it had applied"
    log.close()

"""Crash tests: real `streams` processes SIGKILLed at named crash points and at random
times during a 200k-row batch, then restarted. After the restart the batch must be closed
once, and every output (warehouse, S3 objects and manifests, load ledger, status table and
status topic) must hold each change exactly once: nothing lost, nothing doubled.

Kills come from `STREAMS_CRASH_AT` (streams/faults.py: the process SIGKILLs itself at a
crash point) or from the test (Popen + SIGKILL after a seeded random delay).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import duckdb
import pytest

from connectors.object_formats import decode_changes, extension
from connectors.status_sink import StatusTableSink
from connectors.warehouse import DuckDBWarehouse
from streams.outputs import OutputWriter
from streams.sink_task import SinkTask
from tests.support import expected_members, random_rows, run_cli, warehouse_members, write_csv
from topics.backends import open_log
from topics.codec import decode
from topics.spec import BATCH_STATUS, CHANGES, EVENTS, ROWS

N_ROWS = 200_000
PARTITIONS = 4
S3_PREFIX = ("audience", "segment-changes")
KILLED = -signal.SIGKILL

# Small chunks and messages so that crash points fall in the middle of a partition's work:
# ~29k changes per partition -> 3 chunks each (12 `after_chunk` passes per sink), 200 row
# messages (13 `import.publishing` passes), several processor checkpoints.
TUNING = {
    "STREAMS_CHUNK_ROWS": "10000",
    "STREAMS_MESSAGE_ROWS": "1000",
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


def cli_env(crash_at: str = "") -> dict[str, str]:
    # STREAMS_CRASH_AT is always set, so that a value inherited by pytest cannot leak in.
    return {**TUNING, "STREAMS_CRASH_AT": crash_at}


@dataclass(frozen=True)
class Batch:
    path: Path
    mode: str
    rows: list[tuple[str, str, str]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Batch]:
    folder = tmp_path_factory.mktemp("crash-inputs")
    out = {}
    for name, seed, mode in (("first", 101, "add"), ("second", 202, "replace")):
        rows = random_rows(N_ROWS, users=50_000, segments=3, seed=seed)
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


def has_opened_log(proc: subprocess.Popen[bytes], data_dir: Path) -> bool:
    """The process holds a file of the embedded log open (it has started real work)."""
    log_dir = str((data_dir / "log").resolve())
    try:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
    except FileNotFoundError:  # exited, or no /proc: fall back to the log's existence
        return proc.poll() is not None or (data_dir / "log").is_dir()
    for fd in fds:
        try:
            if os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith(log_dir):
                return True
        except OSError:
            continue
    return proc.poll() is not None


# -- reading what the pipeline holds ---------------------------------------------------------


def statuses(data_dir: Path) -> list[dict[str, Any]]:
    return json.loads(run_cli("status", "--json", data_dir=data_dir, env=cli_env()).stdout)


def status_of(all_statuses: list[dict[str, Any]], source: Path) -> dict[str, Any]:
    found = [s for s in all_statuses if s["source"] == str(source)]
    assert len(found) == 1, f"expected one batch from {source}, got {found}"
    return found[0]


def batch_is_closed(data_dir: Path, batch_id: str) -> bool:
    return any(s["batch_id"] == batch_id and s["status"] == "closed"
               for s in statuses(data_dir))


def group_lags(data_dir: Path, groups: tuple[str, ...] = tuple(GROUPS)) -> dict[str, int | None]:
    """Messages after each group's committed positions, over all partitions of its topic
    (None: the group has not committed anything yet)."""
    log = open_log(f"embedded://{(data_dir / 'log').resolve()}")
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


def caught_up(data_dir: Path, groups: tuple[str, ...] = tuple(GROUPS)) -> bool:
    return all(lag == 0 for lag in group_lags(data_dir, groups).values())


def topic_values(data_dir: Path, topic: str, batch_id: str) -> list[dict[str, Any]]:
    """Values of one batch on `topic`, partition by partition, in log order."""
    log = open_log(f"embedded://{(data_dir / 'log').resolve()}")
    try:
        values = (decode(msg.value)[1] for partition in log.partitions(topic)
                  for msg in log.read(topic, partition))
        return [v for v in values if v["batch_id"] == batch_id]
    finally:
        log.close()


def events_of(data_dir: Path, batch_id: str, kind: str) -> list[dict[str, Any]]:
    return [v for v in topic_values(data_dir, EVENTS, batch_id) if v["kind"] == kind]


def status_snapshots(data_dir: Path, batch_id: str) -> list[dict[str, Any]]:
    """Snapshots of one batch on `pipeline.batch-status`, in log order."""
    return [json.loads(v["json"]) for v in topic_values(data_dir, BATCH_STATUS, batch_id)]


def batch_id_from_output(text: str) -> str:
    match = re.search(r"^batch\s+(\S+?):? ", text, re.MULTILINE)
    assert match, f"no batch id in output:\n{text}"
    return match.group(1)


# -- checks ------------------------------------------------------------------------------------


def check_s3(data_dir: Path, batch_id: str, fmt: str, start: set[tuple[str, str]],
             end: set[tuple[str, str]], changes: int) -> None:
    """The manifest lists every part object once and nothing else is there; folding the
    objects in (partition, first position, row) order turns `start` into `end`, and every
    row is a real change (an add of a non-member, a removal of a member)."""
    folder = data_dir.joinpath("s3", *S3_PREFIX, f"batch={batch_id}")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["batch_id"] == batch_id
    assert manifest["format"] == fmt
    urls = [e["url"] for e in manifest["entries"]]
    assert len(urls) == len(set(urls)), "an object is listed twice in the manifest"

    listed: dict[Path, dict[str, Any]] = {}
    for entry in manifest["entries"]:
        path = Path(unquote(urlparse(entry["url"]).path)).resolve()
        assert path.is_file(), f"manifest lists a missing object {path}"
        listed[path] = entry
    allowed = {folder / "manifest.json"} | {
        folder / f"partition={p}" / "_manifest.json" for p in range(PARTITIONS)}
    on_disk = {p.resolve() for p in folder.rglob("*")
               if p.is_file() and not p.name.startswith(".tmp-")}  # unfinished puts
    stray = sorted(str(p) for p in on_disk - set(listed) - {a.resolve() for a in allowed})
    assert not stray, f"objects in the batch folder that the manifest does not list: {stray}"
    for a in allowed:
        assert a.is_file(), f"missing {a}"

    # Per-partition manifests together list exactly what the batch manifest lists.
    per_partition = []
    for p in range(PARTITIONS):
        part = json.loads((folder / f"partition={p}" / "_manifest.json").read_text("utf-8"))
        per_partition += [e["url"] for e in part["entries"]]
    assert sorted(per_partition) == sorted(urls)

    objects = []
    for path, entry in listed.items():
        match = re.fullmatch(r"partition=(\d+)", path.parent.name)
        assert match, path
        name = re.fullmatch(r"part-(\d{20})" + re.escape(extension(fmt)), path.name)
        assert name, f"unexpected object name {path.name}"
        objects.append((int(match.group(1)), int(name.group(1)), path, entry))
    objects.sort()

    state = set(start)
    total = 0
    for partition, _first, path, entry in objects:
        data = path.read_bytes()
        assert entry["meta"]["content_length"] == len(data)
        rows = decode_changes(data, fmt)
        assert entry["meta"]["record_count"] == len(rows)
        total += len(rows)
        for row in rows:
            assert row["batch_id"] == batch_id and row["partition"] == partition, row
            key = (row["segment_id"], row["user_id"])
            if row["op"] == "add":
                assert key not in state, f"{path.name}: add of a member (doubled?) {row}"
                state.add(key)
            else:
                assert row["op"] == "remove", row
                assert key in state, f"{path.name}: removal of a non-member (doubled?) {row}"
                state.discard(key)
    assert manifest["record_count"] == total
    assert total == changes, f"objects hold {total} changes, the batch status says {changes}"
    assert state == end, (f"S3 changes fold to {len(state)} members, expected {len(end)}: "
                          f"{len(state - end)} extra, {len(end - state)} missing")


def check_warehouse(data_dir: Path, status: dict[str, Any], start: set[tuple[str, str]],
                    end: set[tuple[str, str]]) -> None:
    batch_id = status["batch_id"]
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        ledger = con.execute(
            "SELECT partition, rows_loaded, added, removed FROM load_ledger"
            " WHERE batch_id = ? ORDER BY partition", [batch_id]).fetchall()
        rows = con.execute(
            "SELECT status, epoch_ms(closed_at), rows, rejected FROM batch_status"
            " WHERE batch_id = ?", [batch_id]).fetchall()
    finally:
        con.close()
    assert [r[0] for r in ledger] == list(range(PARTITIONS)), \
        f"load ledger of {batch_id}: {ledger}; expected one row per partition"
    assert sum(r[1] for r in ledger) == status["changes_total"]
    assert sum(r[2] for r in ledger) - sum(r[3] for r in ledger) == len(end) - len(start)
    # (staging is a TEMP table of the sink's connection: nothing of it outlives a load)
    assert len(rows) == 1, f"warehouse batch_status rows for {batch_id}: {rows}"
    assert rows[0] == ("closed", status["closed_at"], N_ROWS, 0), \
        f"warehouse batch_status {rows[0]} != CLI status {status['closed_at']}"


def check_closed_once(data_dir: Path, batch_id: str, closed_at: int) -> None:
    """Snapshots may be re-emitted after a crash (outputs before changelog), but every closed
    snapshot of the batch carries the one time it closed."""
    snapshots = status_snapshots(data_dir, batch_id)
    statuses_seen = [s["status"] for s in snapshots]
    assert "closed" in statuses_seen, f"no closed snapshot of {batch_id}: {statuses_seen}"
    assert "failed" not in statuses_seen, statuses_seen
    assert {s["closed_at"] for s in snapshots if s["status"] == "closed"} == {closed_at}


def verify(data_dir: Path, history: list[Batch], fmt: str = "parquet") -> None:
    """Every batch of `history` (in order) is closed once and delivered exactly once."""
    all_statuses = statuses(data_dir)
    for i, batch in enumerate(history):
        start = expected_members((b.mode, b.rows) for b in history[:i])
        end = expected_members((b.mode, b.rows) for b in history[: i + 1])
        status = status_of(all_statuses, batch.path)
        changes = sum(status["applied"].values())
        status["changes_total"] = changes
        assert status["status"] == "closed", status
        assert status["closed_at"] is not None
        assert status["rejected"] == 0
        assert status["rows"] == N_ROWS - status["rejected"]
        assert sum(status["partition_counts"]) == status["rows"]
        assert status["error"] == ""
        check_s3(data_dir, status["batch_id"], fmt, start, end, changes)
        check_warehouse(data_dir, status, start, end)
        check_closed_once(data_dir, status["batch_id"], status["closed_at"])
    members = warehouse_members(data_dir)
    assert len(members) == len(set(members)), "duplicate (segment, user) rows in the warehouse"
    expected = sorted(expected_members((b.mode, b.rows) for b in history))
    assert members == expected, (f"warehouse holds {len(members)} members, expected "
                                 f"{len(expected)}: {len(set(members) - set(expected))} "
                                 f"extra, {len(set(expected) - set(members))} missing")


# -- 1. crash points ---------------------------------------------------------------------------

CRASH_POINTS = [
    "import.publishing",  # mid-import: after the first 16 row messages
    "import.publishing:8",
    "import.before_end_markers",
    "import.end_marker:2",  # between the 2nd and the 3rd end marker
    "segments.after_outputs",  # mid-processing: rows applied, end markers not yet
    "segments.after_changelog",
    "pipeline.after_outputs",
    "pipeline.after_changelog",
    "sink-s3.after_chunk:7",  # a sink wrote a chunk, before anything committed
    "sink-warehouse.after_chunk:8",
    "sink-s3.after_close",  # after a partition's manifest, before sink_committed
    "sink-s3.after_close:4",  # the last partition: after the batch manifest
    "sink-warehouse.after_close:2",  # after a merge, before sink_committed
    "sink-warehouse.after_close:4",  # the last merge
]


def assert_killed(crashed: subprocess.CompletedProcess[str], crash_at: str) -> None:
    """`streams run` runs the sinks in a child process: a sink crash point kills the child,
    and the parent then stops with an error saying so; any other point kills the parent."""
    detail = (f"STREAMS_CRASH_AT={crash_at}: exit {crashed.returncode}\n"
              f"stdout:\n{crashed.stdout}\nstderr:\n{crashed.stderr}")
    if crash_at.startswith("sink-"):
        assert crashed.returncode == 1, detail
        assert "worker process was killed by SIGKILL" in crashed.stderr, detail
        assert "run the same command again" in crashed.stderr, detail
    else:
        assert crashed.returncode == KILLED, detail


def crash_then_rerun(args: tuple[str, ...], data_dir: Path, crash_at: str) -> None:
    crashed = run_cli(*args, data_dir=data_dir, env=cli_env(crash_at), check=False)
    assert_killed(crashed, crash_at)
    rerun = run_cli(*args, data_dir=data_dir, env=cli_env())
    assert re.search(r"^status\s+closed$", rerun.stdout, re.MULTILINE), rerun.stdout


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_run_killed_at_crash_point_then_rerun_delivers_once(
        tmp_path: Path, inputs: dict[str, Batch], crash_at: str) -> None:
    data_dir = tmp_path / "data"
    batch = inputs["first"]
    crash_then_rerun(("run", "-q", str(batch.path)), data_dir, crash_at)
    verify(data_dir, [batch])


@pytest.mark.parametrize("crash_at", ["sink-s3.after_chunk:5"])
def test_run_killed_with_jsonl_objects(tmp_path: Path, inputs: dict[str, Batch],
                                       crash_at: str) -> None:
    data_dir = tmp_path / "data"
    batch = inputs["first"]
    crash_then_rerun(("--s3-format", "jsonl", "run", "-q", str(batch.path)), data_dir,
                     crash_at)
    verify(data_dir, [batch], fmt="jsonl")


@pytest.mark.parametrize("crash_at", [
    "import.end_marker:2",  # end markers of partitions 0 and 1 are sent twice
    "segments.after_outputs:2",  # the checkpoint that holds the end-marker removals
    "sink-warehouse.after_close:3",
])
def test_replace_batch_killed_then_rerun_removes_once(
        tmp_path: Path, inputs: dict[str, Batch], crash_at: str) -> None:
    data_dir = tmp_path / "data"
    first, second = inputs["first"], inputs["second"]
    run_cli("run", "-q", str(first.path), data_dir=data_dir, env=cli_env())
    crash_then_rerun(("run", "-q", "--mode", "replace", str(second.path)), data_dir, crash_at)
    verify(data_dir, [first, second])


def test_run_killed_in_processor_then_in_sink_then_rerun_delivers_once(
        tmp_path: Path, inputs: dict[str, Batch]) -> None:
    """Two kills in a row, as a random kill lands them. The 1st (segments.after_outputs)
    makes the rerun's processor re-emit its first checkpoint: partitions 0-2 of the changes
    topic hold every change and the end marker twice. In the 2nd run the sink's polls end
    inside the duplicates, so it commits a skipped duplicate (one whose stamp is below the
    end marker it already applied); it is killed at a later chunk (sink-s3.after_chunk:7,
    partition 2) before committing past the duplicates. The 3rd run must resume after that
    duplicate without taking the rest of the duplicates for a new run of the batch."""
    data_dir = tmp_path / "data"
    batch = inputs["first"]
    args = ("run", "-q", str(batch.path))
    for crash_at in ("segments.after_outputs", "sink-s3.after_chunk:7"):
        crashed = run_cli(*args, data_dir=data_dir, env=cli_env(crash_at), check=False)
        assert_killed(crashed, crash_at)
    rerun = run_cli(*args, data_dir=data_dir, env=cli_env(), check=False)
    assert rerun.returncode == 0, f"stdout:\n{rerun.stdout}\nstderr:\n{rerun.stderr}"
    verify(data_dir, [batch])


# -- 2. kills from outside at random times -----------------------------------------------------


def test_run_killed_from_outside_at_random_times(
        tmp_path: Path, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    rng = random.Random(8_675_309)
    data_dir = tmp_path / "data"
    batch = inputs["first"]
    outcomes = []
    for attempt in range(3):
        delay = rng.uniform(0.3, 3.0)
        name = f"run-{attempt}"
        proc = spawn("run", "-q", str(batch.path), data_dir=data_dir, env=cli_env(), name=name)
        wait_for(lambda proc=proc: has_opened_log(proc, data_dir), 60,
                 f"{name} to open the log")
        try:
            proc.wait(timeout=delay)  # it may finish by itself before the kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode in (0, KILLED), output_of(tmp_path, name)
        outcomes.append((round(delay, 2), proc.returncode))
    assert any(code == KILLED for _d, code in outcomes), f"no kill landed: {outcomes}"
    final = run_cli("run", "-q", str(batch.path), data_dir=data_dir, env=cli_env())
    assert re.search(r"^status\s+closed$|nothing changed", final.stdout, re.MULTILINE), \
        final.stdout
    verify(data_dir, [batch])


# -- 3. a separate worker, killed and restarted, then stopped cleanly --------------------------


def test_worker_killed_at_checkpoint_restarted_and_stopped_cleanly(
        tmp_path: Path, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    data_dir = tmp_path / "data"
    batch = inputs["first"]
    imported = run_cli("import", "-q", str(batch.path), data_dir=data_dir, env=cli_env())
    batch_id = batch_id_from_output(imported.stdout)

    first = spawn("worker", data_dir=data_dir, env=cli_env("segments.after_changelog"),
                  name="worker-1")
    assert first.wait(timeout=120) == KILLED, output_of(tmp_path, "worker-1")
    assert not batch_is_closed(data_dir, batch_id)

    second = spawn("worker", data_dir=data_dir, env=cli_env(), name="worker-2")
    wait_for(lambda: batch_is_closed(data_dir, batch_id), 180, f"batch {batch_id} to close",
             interval=0.2)
    # Closed in the status view (which folds events the pipeline processor may not have
    # seen yet); let the worker also fold them and deliver the last snapshots.
    delivery = ("processor-pipeline", "sink-s3", "sink-warehouse", "sink-warehouse-status")
    wait_for(lambda: caught_up(data_dir, delivery), 60, f"groups {delivery} to catch up")
    assert second.poll() is None, output_of(tmp_path, "worker-2")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=10) == 0, output_of(tmp_path, "worker-2")
    assert "worker stopped cleanly" in output_of(tmp_path, "worker-2")
    verify(data_dir, [batch])
    lags = group_lags(data_dir)
    assert all(lag == 0 for lag in lags.values()), (
        f"a cleanly stopped worker left consumed messages uncommitted: {lags} (a restart "
        "re-reads them, and monitoring reports a lag that never drains)")


# -- 4. double-fired trigger -------------------------------------------------------------------


def test_same_file_twice_changes_nothing_and_reused_batch_id_is_refused(
        tmp_path: Path, inputs: dict[str, Batch]) -> None:
    data_dir = tmp_path / "data"
    first, other = inputs["first"], inputs["second"]
    args = ("run", "-q", "--batch-id", "crash-dup-1", str(first.path))
    run_cli(*args, data_dir=data_dir, env=cli_env())
    snapshots = len(status_snapshots(data_dir, "crash-dup-1"))
    again = run_cli(*args, data_dir=data_dir, env=cli_env())
    assert "nothing changed" in again.stdout, again.stdout
    assert len(status_snapshots(data_dir, "crash-dup-1")) == snapshots

    refused = run_cli("import", "-q", "--batch-id", "crash-dup-1", str(other.path),
                      data_dir=data_dir, env=cli_env(), check=False)
    assert refused.returncode != 0
    assert "crash-dup-1" in refused.stdout + refused.stderr, refused.stderr
    verify(data_dir, [first])


# -- 5. kills in the last steps of a batch, and what a kill leaves on disk ---------------------


def kill_after_sinks_then_pipeline_at_close(
        data_dir: Path, batch: Batch, spawn: Callable[..., subprocess.Popen[bytes]]) -> str:
    """Leaves `data_dir` as a `streams run` SIGKILLed in the last steps of a batch: every
    sink has committed every partition, and the pipeline processor has folded those events
    and flushed the closed snapshot, but died before its changelog and offsets (crash point
    `pipeline.after_outputs`) and before the status sink saw the snapshot. In one all-roles
    process a random kill falls there as easily as anywhere; role workers make it
    deterministic. Returns the batch id."""
    imported = run_cli("import", "-q", str(batch.path), data_dir=data_dir, env=cli_env())
    batch_id = batch_id_from_output(imported.stdout)
    sinks = spawn("worker", "--roles", "segments,s3,warehouse", data_dir=data_dir,
                  env=cli_env(), name="sinks")
    wait_for(lambda: len(events_of(data_dir, batch_id, "sink_committed")) >= 2 * PARTITIONS
             or sinks.poll() is not None, 120, "every sink to commit every partition",
             interval=0.1)
    sinks.send_signal(signal.SIGKILL)
    assert sinks.wait(timeout=30) == KILLED
    pipeline = spawn("worker", "--roles", "pipeline", data_dir=data_dir,
                     env=cli_env("pipeline.after_outputs"), name="pipeline")
    assert pipeline.wait(timeout=60) == KILLED
    assert any(s["status"] == "closed" for s in status_snapshots(data_dir, batch_id))
    return batch_id


def test_run_again_after_kill_between_last_sink_commit_and_status_delivery(
        tmp_path: Path, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """Running the same `streams run` again must close the batch everywhere: in the
    pipeline's own table and offsets and in the warehouse's batch_status table, not only in
    the status view that folds the events no processor has applied yet."""
    data_dir = tmp_path / "data"
    batch = inputs["first"]
    kill_after_sinks_then_pipeline_at_close(data_dir, batch, spawn)
    run_cli("run", "-q", str(batch.path), data_dir=data_dir, env=cli_env())
    verify(data_dir, [batch])


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


def statuses_a_status_sink_stores(data_dir: Path, batch_id: str, scratch: Path) -> list[str]:
    """Feeds `pipeline.batch-status` as it now stands through the production status sink
    (SinkTask + StatusTableSink + DuckDB upsert, in a fresh consumer group and a scratch
    database): the sequence of statuses a dashboard would have read for the batch."""
    log = open_log(f"embedded://{(data_dir / 'log').resolve()}")
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
        tmp_path: Path, inputs: dict[str, Batch],
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """The pipeline processor killed after flushing the closed snapshot but before its
    changelog re-emits, on restart, every snapshot since its last checkpoint: submitted,
    published, ..., closed again. The warehouse's batch_status (and any dashboard or trigger
    on the status topic) must not see the batch go from closed back to submitted/published
    and close a second time."""
    data_dir = tmp_path / "data"
    batch = inputs["first"]
    batch_id = kill_after_sinks_then_pipeline_at_close(data_dir, batch, spawn)
    # Restart the pipeline processor alone; the status topic is then checked through the
    # production status sink below, whatever a warehouse worker would have read meanwhile.
    worker = spawn("worker", "--roles", "pipeline", data_dir=data_dir, env=cli_env(),
                   name="pipeline-2")
    wait_for(lambda: caught_up(data_dir, ("processor-pipeline",)), 60,
             "the pipeline processor to catch up", interval=0.1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, output_of(tmp_path, "pipeline-2")
    assert batch_is_closed(data_dir, batch_id)

    seen = statuses_a_status_sink_stores(data_dir, batch_id, tmp_path / "scratch.duckdb")
    closed = seen.index("closed")
    assert all(s == "closed" for s in seen[closed:]), (
        f"the warehouse batch_status of {batch_id} left 'closed' after it closed: {seen}")


def test_killed_import_leaves_no_spool_file_behind(tmp_path: Path) -> None:
    """The importer spools the whole file before publishing; a SIGKILLed import must not
    leave that copy on disk forever once the batch has been finished by a rerun."""
    data_dir = tmp_path / "data"
    path = write_csv(tmp_path / "small.csv", random_rows(20_000, users=5_000, segments=3,
                                                         seed=7))
    args = ("run", "-q", str(path))
    crashed = run_cli(*args, data_dir=data_dir, env=cli_env("import.publishing"), check=False)
    assert crashed.returncode == KILLED, crashed.stderr
    run_cli(*args, data_dir=data_dir, env=cli_env())
    left = sorted(p.name for p in (data_dir / "spool").iterdir())
    assert left == [], f"spool files left behind by the killed import: {left}"

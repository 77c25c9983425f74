"""End to end through the `streams` CLI: real processes, the embedded backend, a fresh data
dir per test. Checks the warehouse against the independent model in tests/support.py and
the S3 sink's objects against the exact list of real membership changes."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.importer import derived_batch_id
from connectors.object_formats import decode_changes
from connectors.object_store import LocalObjectStore
from connectors.s3_fold import fold_objects
from tests.support import expected_members, random_rows, run_cli, warehouse_members, write_csv
from topics.partitioner import partition_for
from topics.spec import ROWS, SPECS

PARTITIONS = SPECS[ROWS].partitions
PREFIX = ("audience", "segment-changes")
Row = tuple[str, str, str]
Change = tuple[str, str, str, int]  # (user_id, segment_id, op, seq)


# ---------------------------------------------------------------------------- helpers


def statuses(data_dir: Path) -> list[dict[str, Any]]:
    return json.loads(run_cli("status", "--json", data_dir=data_dir).stdout)


def status_of(data_dir: Path, batch_id: str) -> dict[str, Any]:
    (found,) = [s for s in statuses(data_dir) if s["batch_id"] == batch_id]
    return found


def batch_dir(data_dir: Path, batch_id: str) -> Path:
    return data_dir.joinpath("s3", *PREFIX, f"batch={batch_id}")


def expected_changes(before: set[tuple[str, str]], mode: str, rows: list[Row]
                     ) -> tuple[dict[int, list[Change]], set[tuple[str, str]]]:
    """The real changes a batch makes, per partition in the order the processor makes them
    (file order, then a replace's removals sorted by user), and the membership after."""
    members = set(before)
    changes: dict[int, list[Change]] = defaultdict(list)
    listed: set[tuple[str, str]] = set()
    for seq, (user, segment, op) in enumerate(rows, start=1):
        key, p = (segment, user), partition_for(user, PARTITIONS)
        if op == "add":
            listed.add(key)
            if key not in members:
                members.add(key)
                changes[p].append((user, segment, "add", seq))
        else:
            listed.discard(key)
            if key in members:
                members.discard(key)
                changes[p].append((user, segment, "remove", seq))
    if mode == "replace":
        named = {segment for _u, segment, _o in rows}
        for user, segment in sorted((u, s) for s, u in members
                                    if s in named and (s, u) not in listed):
            members.discard((segment, user))
            changes[partition_for(user, PARTITIONS)].append((user, segment, "remove", -1))
    return dict(changes), members


def s3_changes(data_dir: Path, batch_id: str, fmt: str) -> dict[int, list[Change]]:
    """The batch's changes as its COPY manifest lists them, per partition, in object order;
    checks the manifest against the objects on disk on the way."""
    root = batch_dir(data_dir, batch_id)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["batch_id"] == batch_id and manifest["format"] == fmt
    listed: dict[Path, dict[str, Any]] = {}
    for entry in manifest["entries"]:
        url = urlparse(entry["url"])
        assert url.scheme == "file" and entry["mandatory"] is True
        listed[Path(unquote(url.path))] = entry["meta"]
    on_disk = {p.resolve() for p in root.rglob(f"part-*.{fmt}")}
    assert set(listed) == on_disk, "the manifest must list exactly the batch's objects"
    out: dict[int, list[Change]] = defaultdict(list)
    total = 0
    for path in sorted(listed, key=lambda p: (int(p.parent.name.split("=")[1]), p.name)):
        data = path.read_bytes()
        rows = decode_changes(data, fmt)
        assert listed[path] == {"content_length": len(data), "record_count": len(rows)}
        partition = int(path.parent.name.split("=")[1])
        for r in rows:
            assert r["batch_id"] == batch_id and r["partition"] == partition
            out[partition].append((r["user_id"], r["segment_id"], r["op"], r["seq"]))
        total += len(rows)
    assert manifest["record_count"] == total
    return dict(out)


def s3_files(data_dir: Path) -> dict[str, bytes]:
    root = data_dir / "s3"
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def s3_hashes(data_dir: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in s3_files(data_dir).items()}


def ledger_batches(data_dir: Path) -> set[str]:
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        return {b for (b,) in con.execute("SELECT batch_id FROM load_ledger").fetchall()}
    finally:
        con.close()


def topic_messages(data_dir: Path) -> dict[tuple[str, int], int]:
    out = run_cli("topics", data_dir=data_dir).stdout
    table = out.split("\n\n")[0].splitlines()[1:]
    return {(name, int(part)): int(messages)
            for name, part, messages, *_ in (line.split() for line in table)}


def members_set(data_dir: Path) -> set[tuple[str, str]]:
    return set(warehouse_members(data_dir))


# ------------------------------------------------------- (a), (b): three batches, formats


def three_batches(tmp_path: Path) -> list[tuple[str, str, Path, list[Row]]]:
    """(batch id, mode, file, rows): 20k adds (with some removes), a replace of seg-1, and
    a file of mostly op=remove rows."""
    first = random_rows(20_000, users=6_000, segments=5, seed=1, remove_share=0.1)
    second = [(u, "seg-1", op) for u, _s, op in
              random_rows(3_000, users=8_000, segments=1, seed=2, remove_share=0.05)]
    third = random_rows(4_000, users=6_000, segments=5, seed=3, remove_share=0.8)
    return [("b-add", "add", write_csv(tmp_path / "first.csv", first), first),
            ("b-replace", "replace", write_csv(tmp_path / "second.csv", second), second),
            ("b-remove", "add", write_csv(tmp_path / "third.csv", third), third)]


def run_three(data_dir: Path, fmt: str, batches: list[tuple[str, str, Path, list[Row]]],
              check: bool) -> None:
    members: set[tuple[str, str]] = set()
    changes: dict[str, int] = {}
    for i, (batch_id, mode, path, rows) in enumerate(batches):
        proc = run_cli("--s3-format", fmt, "--chunk-rows", "1000", "run", str(path),
                       "--mode", mode, "--batch-id", batch_id, "-q", data_dir=data_dir)
        if not check:
            continue
        assert "status      closed" in proc.stdout
        want, members = expected_changes(members, mode, rows)
        assert members == expected_members([(m, r) for _b, m, _p, r in batches[:i + 1]])
        assert members_set(data_dir) == members
        got = s3_changes(data_dir, batch_id, fmt)
        assert {p: c for p, c in got.items() if c} == want
        changes[batch_id] = sum(map(len, want.values()))
    if check:
        found = statuses(data_dir)
        assert [st["batch_id"] for st in found] == [b[0] for b in batches]  # by submission
        for status in found:
            assert status["status"] == "closed"
            assert sum(status["applied"].values()) == changes[status["batch_id"]]
            manifest = (batch_dir(data_dir, status["batch_id"]) / "manifest.json").resolve()
            assert status["locations"]["s3"] == f"file://{manifest}"  # '=' kept readable


@pytest.mark.parametrize("fmt", ["parquet", "avro", "jsonl"])
def test_three_batches_warehouse_and_s3_objects(tmp_path: Path, fmt: str) -> None:
    batches = three_batches(tmp_path)
    a = tmp_path / "a" / "data"
    a.parent.mkdir()
    run_three(a, fmt, batches, check=True)
    if fmt == "parquet":
        return  # (Parquet's bytes are compared across data dirs in the input-format test.)
    # The same input in a fresh data dir: the same keys and the same bytes. Manifests name
    # objects by URL, which holds the data dir: equal once that root is factored out.
    b = tmp_path / "b" / "data"
    b.parent.mkdir()
    run_three(b, fmt, batches, check=False)
    files_a, files_b = s3_files(a), s3_files(b)
    assert sorted(files_a) == sorted(files_b)
    assert any(k.endswith(f".{fmt}") for k in files_a)
    root_a, root_b = ((d / "s3").resolve().as_uri().encode() for d in (a, b))
    for key, data in files_a.items():
        if key.endswith("manifest.json"):
            assert data.replace(root_a, b"ROOT") == files_b[key].replace(root_b, b"ROOT"), key
        else:
            assert data == files_b[key], key


def test_replace_removals_spanning_sink_chunks_are_all_kept(tmp_path: Path) -> None:
    """Regression, the CLI repro: 40,000 members of s, then a replace listing one user. Each
    partition's end marker removes ~10,000 members in parts of 5,000 that share its source
    position; chunks of 5,000 were named by that position alone, so the later chunks
    replaced the earlier ones (the S3 object overwritten, the warehouse's staging slot
    replaced) and the warehouse kept 30,001 members."""
    data = tmp_path / "data"
    users = [(f"user-{i}", "s", "add") for i in range(40_000)]
    env = {"STREAMS_CHUNK_ROWS": "5000"}
    run_cli("run", str(write_csv(tmp_path / "all.csv", users)), "--batch-id", "b-all", "-q",
            data_dir=data, env=env)
    one = write_csv(tmp_path / "one.csv", [("user-7", "s", "add")], with_op=False)
    proc = run_cli("run", str(one), "--segment", "s", "--mode", "replace", "--batch-id",
                   "b-one", "-q", data_dir=data, env=env)
    assert "status      closed" in proc.stdout
    assert members_set(data) == {("s", "user-7")}
    got = s3_changes(data, "b-one", "parquet")
    assert sorted(u for c in got.values() for u, _s, op, _q in c if op == "remove") == sorted(
        u for u, _s, _o in users if u != "user-7")
    names = sorted(p.name for p in batch_dir(data, "b-one").rglob("part-*"))
    assert len(names) == len(set(names)) >= 2 * PARTITIONS  # ~10,000 removals each
    store = LocalObjectStore(data / "s3")
    assert fold_objects(store, "/".join(PREFIX)) == {("s", "user-7")}


# ----------------------------------------------------------------- (c) status, (d) topics


def test_status_json_and_table(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = random_rows(3_000, users=1_000, segments=3, seed=5)
    path = write_csv(tmp_path / "in.csv", rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(",seg-0,add\nuser-1,seg-0,explode\n")  # 2 bad rows, under the 1% budget
    run_cli("run", str(path), "-q", data_dir=data)
    (s,) = statuses(data)
    checksum = hashlib.sha256(path.read_bytes()).hexdigest()
    # The batch id is the request's identity: the content's checksum and the options.
    request = {"format": "csv", "delimiter": ",", "mode": "add", "segment": ""}
    assert s["batch_id"] == derived_batch_id(checksum, request) and s["checksum"] == checksum
    assert s["request"] == request and s["interrupted"] is False
    assert s["status"] == "closed" and s["error"] == ""
    assert (s["rows"], s["rejected"]) == (3_000, 2)
    assert len(s["partition_counts"]) == s["partitions"] == PARTITIONS
    assert sum(s["partition_counts"]) == s["rows"]
    assert s["partition_counts"] == [
        sum(1 for u, _s, _o in rows if partition_for(u, PARTITIONS) == p)
        for p in range(PARTITIONS)]
    stamps = [s[k] for k in ("submitted_at", "published_at", "applied_at", "closed_at")]
    assert all(isinstance(t, int) for t in stamps) and stamps == sorted(stamps)
    assert s["failed_at"] is None
    assert s["source"] == str(path) and s["mode"] == "add"
    assert s["segments"] == ["seg-0", "seg-1", "seg-2"]
    assert s["committed"] == {"s3": list(range(PARTITIONS)),
                              "warehouse": list(range(PARTITIONS))}
    want, _members = expected_changes(set(), "add", rows)
    assert sum(s["applied"].values()) == sum(map(len, want.values()))
    assert members_set(data) == expected_members([("add", rows)])

    table = run_cli("status", data_dir=data).stdout.splitlines()
    assert table[0].split()[:5] == ["BATCH", "STATUS", "ROWS", "REJECTED", "CHANGES"]
    (line,) = [ln for ln in table[1:] if ln.startswith(s["batch_id"])]
    assert line.split()[1:4] == ["closed", "3,000", "2"]
    one = json.loads(run_cli("status", s["batch_id"], "--json", data_dir=data).stdout)
    assert one == [s]
    missing = run_cli("status", "b-nope", data_dir=data, check=False)
    assert missing.returncode != 0 and "no batch b-nope" in missing.stderr
    # The same file again (a double-fired trigger): recognised, nothing changes.
    again = run_cli("run", str(path), "-q", data_dir=data)
    assert f"batch {s['batch_id']}: this file was already imported" in again.stdout
    assert statuses(data) == [s]
    assert members_set(data) == expected_members([("add", rows)])


def test_topics_lists_every_topic_and_groups_with_zero_lag(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_csv(tmp_path / "in.csv", random_rows(2_000, 500, 3, seed=6))
    run_cli("run", str(path), "-q", data_dir=data)
    out = run_cli("topics", data_dir=data).stdout
    topics_part, groups_part = out.split("\n\n")
    listed = {(f[0], int(f[1])) for f in (ln.split() for ln in topics_part.splitlines()[1:])}
    assert listed == {(name, p) for name, spec in SPECS.items() for p in range(spec.partitions)}
    lines = [ln.split() for ln in groups_part.strip().splitlines()]
    assert lines[0] == ["GROUP", "TOPIC", "PART", "COMMITTED", "LAG", "OWNER"]
    seen: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for group, topic, part, _committed, lag, owner in lines[1:]:
        assert lag == "0", f"{group} {topic}[{part}] lags {lag}"
        assert owner == "-"  # the run's worker left its groups
        seen[group].add((topic, int(part)))
    every = {name: {(name, p) for p in range(spec.partitions)} for name, spec in SPECS.items()}
    assert dict(seen) == {
        "processor-segments": every["audience.rows"],
        "processor-pipeline": every["pipeline.events"],
        "sink-s3": every["audience.segment-changes"],
        "sink-warehouse": every["audience.segment-changes"],
        "sink-warehouse-status": every["pipeline.batch-status"],
    }
    assert topic_messages(data)[("audience.rows", 0)] > 0


# ------------------------------------------------------------------------------ (e) replay


def _snapshot(data_dir: Path) -> tuple[set[tuple[str, str]], dict[str, str], str]:
    return (members_set(data_dir), s3_hashes(data_dir),
            run_cli("status", "--json", data_dir=data_dir).stdout)


def _two_batches(tmp_path: Path, data: Path) -> list[str]:
    first = random_rows(5_000, users=2_000, segments=4, seed=7)
    second = [(u, "seg-2", "add") for u, _s, _o in random_rows(800, 2_000, 1, seed=8)]
    run_cli("run", str(write_csv(tmp_path / "1.csv", first)), "--batch-id", "b-one", "-q",
            data_dir=data)
    run_cli("run", str(write_csv(tmp_path / "2.csv", second)), "--batch-id", "b-two",
            "--mode", "replace", "-q", data_dir=data)
    assert members_set(data) == expected_members([("add", first), ("replace", second)])
    return ["b-one", "b-two"]


def test_replay_from_batch_leaves_outputs_identical(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _two_batches(tmp_path, data)
    before = _snapshot(data)
    for start in ("batch:b-two", "batch:b-one"):
        proc = run_cli("replay", "--from", start, "-q", data_dir=data)
        assert f"replayed from {start}" in proc.stdout
        assert _snapshot(data) == before, start
    unknown = run_cli("replay", "--from", "batch:b-nope", data_dir=data, check=False)
    assert unknown.returncode != 0 and "no message of batch b-nope" in unknown.stderr
    assert _snapshot(data) == before


def test_replay_from_earliest_rebuilds_identical_outputs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _two_batches(tmp_path, data)
    before = _snapshot(data)
    proc = run_cli("replay", "--from", "earliest", "-q", data_dir=data, check=False)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
    assert "replayed from earliest" in proc.stdout
    assert _snapshot(data) == before
    assert ledger_batches(data) == {"b-one", "b-two"}


def _read_lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)
    into.put("")  # EOF


def test_replay_is_refused_while_a_worker_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _two_batches(tmp_path, data)
    before = _snapshot(data)
    env = {**os.environ, "STREAMS_DATA_DIR": str(data)}
    worker = subprocess.Popen([sys.executable, "-m", "streams", "worker"], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_read_lines, args=(worker.stderr, lines), daemon=True).start()
        seen: list[str] = []
        while not (seen and seen[-1].startswith("worker running")):  # its groups are joined
            seen.append(lines.get(timeout=60))
            assert seen[-1] != "", f"the worker exited early: {''.join(seen)}"
        proc = run_cli("replay", "--from", "earliest", data_dir=data, check=False)
        assert proc.returncode != 0
        assert "stop the workers" in proc.stderr
        assert "processor-segments" in proc.stderr
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        rest = []
        while (line := lines.get(timeout=10)) != "":
            rest.append(line)
        assert "worker stopped cleanly" in "".join(rest)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    # Refused means untouched: not rewound, nothing re-delivered.
    assert _snapshot(data) == before


# --------------------------------------------------------------------- (f) input formats


def test_jsonl_and_parquet_inputs_match_csv(tmp_path: Path) -> None:
    rows = random_rows(6_000, users=2_000, segments=4, seed=9)
    csv_path = write_csv(tmp_path / "in.csv", rows)
    jsonl_path = tmp_path / "in.jsonl"
    jsonl_path.write_text("".join(
        json.dumps({"user_id": u, "segment_id": s, "op": o}) + "\n" for u, s, o in rows),
        encoding="utf-8")
    parquet_path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"user_id": [r[0] for r in rows], "segment_id": [r[1] for r in rows],
                             "op": [r[2] for r in rows]}), parquet_path)
    want = expected_members([("add", rows)])
    objects = []
    for name, path in (("csv", csv_path), ("jsonl", jsonl_path), ("parquet", parquet_path)):
        data = tmp_path / name / "data"
        data.parent.mkdir()
        run_cli("run", str(path), "--batch-id", "b-same", "-q", data_dir=data)
        assert members_set(data) == want, name
        (s,) = statuses(data)
        assert (s["status"], s["rows"], s["rejected"]) == ("closed", 6_000, 0)
        objects.append({k: v for k, v in s3_files(data).items()
                        if not k.endswith("manifest.json")})
    assert objects[0] == objects[1] == objects[2]  # same rows, same batch id: same bytes


# ------------------------------------------------------------------- (g) the error budget


def _bad_file(tmp_path: Path) -> tuple[Path, list[Row], dict[int, str]]:
    """1000 data rows, 30 of them bad (3%): (file, good rows, row number -> reason part)."""
    good: list[Row] = []
    bad: dict[int, str] = {}
    lines = ["user_id,segment_id,op"]
    for n, (user, segment, op) in enumerate(random_rows(1_000, 300, 3, seed=10), start=1):
        if n % 100 == 7:
            lines.append(f",{segment},{op}")
            bad[n] = "user_id is missing or blank"
        elif n % 100 == 41:
            lines.append(f"{user},{segment},explode")
            bad[n] = "op 'explode' is not one of: add, remove"
        elif n % 100 == 77:
            lines.append(f"{user},{segment},{op},extra")
            bad[n] = "expected 3 fields, got 4"
        else:
            lines.append(f"{user},{segment},{op}")
            good.append((user, segment, op))
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(bad) == 30
    return path, good, bad


def test_bad_rows_over_the_budget_fail_the_batch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path, _good, bad = _bad_file(tmp_path)
    proc = run_cli("run", str(path), "-q", data_dir=data, check=False)
    assert proc.returncode != 0
    assert "error budget" in proc.stdout + proc.stderr
    (s,) = statuses(data)
    assert s["status"] == "failed" and s["failed_step"] == "import"
    assert "30 of 1000 rows rejected" in s["error"]
    assert "error budget of 1% of the rows" in s["error"]
    assert s["published_at"] is None and s["closed_at"] is None
    # Nothing of the batch reached the rows topic or the warehouse.
    assert all(n == 0 for (topic, _p), n in topic_messages(data).items()
               if topic in ("audience.rows", "audience.segment-changes"))
    if (data / "warehouse.duckdb").exists():
        assert members_set(data) == set()
        assert ledger_batches(data) == set()
    assert not batch_dir(data, s["batch_id"]).exists()
    dead = run_cli("dead-letters", data_dir=data).stdout.splitlines()
    assert len(dead) == 30
    lines_of_bad = dict(enumerate(path.read_text(encoding="utf-8").splitlines()))
    for line, (row, reason) in zip(dead, sorted(bad.items()), strict=True):
        raw = lines_of_bad[row]
        assert line == f"{s['batch_id']} {path}:{row}: {reason} (line {row + 1}) | raw: {raw}"
    only = run_cli("dead-letters", s["batch_id"], "--limit", "5", data_dir=data).stdout
    assert len(only.splitlines()) == 6 and "more; raise --limit" in only


def test_failed_import_status_counts_the_rejected_rows(tmp_path: Path) -> None:
    """The importer's `failed` event carries rows and rejected; the status should keep them
    (the design: bad rows are counted in the batch status)."""
    data = tmp_path / "data"
    path, good, _bad = _bad_file(tmp_path)
    run_cli("run", str(path), "-q", data_dir=data, check=False)
    (s,) = statuses(data)
    assert s["status"] == "failed"
    assert (s["rows"], s["rejected"]) == (len(good), 30)


def test_bad_rows_within_a_raised_budget_are_counted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path, good, bad = _bad_file(tmp_path)
    proc = run_cli("run", str(path), "--max-rejects", "5%", "-q", data_dir=data)
    assert "status      closed" in proc.stdout
    (s,) = statuses(data)
    assert (s["status"], s["rows"], s["rejected"]) == ("closed", 970, 30)
    assert sum(s["partition_counts"]) == 970
    assert members_set(data) == expected_members([("add", good)])
    dead = run_cli("dead-letters", data_dir=data).stdout.splitlines()
    assert [int(line.split(":")[1]) for line in dead] == sorted(bad)
    # A count works as well as a share: 29 rows is one too few.
    other = tmp_path / "other"
    over = run_cli("run", str(path), "--max-rejects", "29", "-q", data_dir=other, check=False)
    assert over.returncode != 0 and "error budget of 29 rows" in over.stdout + over.stderr


# --------------------------------------------------------------- (h) whole-file errors


def test_whole_file_errors_publish_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    unknown = write_csv(tmp_path / "users.txt", [("user-1", "seg-1", "add")])
    header_only = tmp_path / "head.csv"
    header_only.write_text("user_id,segment_id\n", encoding="utf-8")
    cases = {tmp_path / "nope.csv": "no such file", empty: "is empty",
             unknown: "unknown format", header_only: "no data rows"}
    for path, what in cases.items():
        proc = run_cli("run", str(path), data_dir=data, check=False)
        assert proc.returncode != 0, path
        assert str(path) in proc.stderr and what in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    # Nothing was submitted or published by any of them.
    assert statuses(data) == []
    assert not any(topic_messages(data).values())


# ---------------------------------------------------------------------- (i) configuration


def streams(*args: str, cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """`streams` with no STREAMS_* variable but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    return subprocess.run([sys.executable, "-m", "streams", *args], cwd=cwd,
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def _ran_in(data_dir: Path) -> bool:
    return (data_dir / "warehouse.duckdb").exists() and (data_dir / "log").is_dir()


def test_data_dir_from_flag_env_and_config_file(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = write_csv(tmp_path / "in.csv", random_rows(500, 100, 2, seed=11))
    want = expected_members([("add", random_rows(500, 100, 2, seed=11))])

    flag = tmp_path / "by-flag"
    proc = streams("--data-dir", str(flag), "run", str(path), "-q", cwd=work)
    assert proc.returncode == 0, proc.stderr
    env_dir = tmp_path / "by-env"
    proc = streams("run", str(path), "-q", cwd=work, env={"STREAMS_DATA_DIR": str(env_dir)})
    assert proc.returncode == 0, proc.stderr
    (work / "streams.toml").write_text('data_dir = "by-file"\n', encoding="utf-8")
    proc = streams("run", str(path), "-q", cwd=work)
    assert proc.returncode == 0, proc.stderr
    for d in (flag, env_dir, work / "by-file"):
        assert _ran_in(d), d
        assert members_set(d) == want, d
    # An explicit config file, by flag ([streams] table, dashed keys) or by STREAMS_CONFIG.
    by_config = tmp_path / "by-config"
    conf = tmp_path / "elsewhere.toml"
    conf.write_text(f'[streams]\ndata-dir = "{by_config}"\n', encoding="utf-8")
    proc = streams("--config", str(conf), "status", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (by_config / "log").is_dir()
    by_config_env = tmp_path / "by-config-env"
    conf2 = tmp_path / "viaenv.toml"
    conf2.write_text(f'data_dir = "{by_config_env}"\n', encoding="utf-8")
    proc = streams("status", "--json", cwd=work, env={"STREAMS_CONFIG": str(conf2)})
    assert proc.returncode == 0, proc.stderr
    assert (by_config_env / "log").is_dir()
    # ... and the directory really is the one used: it answers with the batch run there.
    conf.write_text(f'[streams]\ndata-dir = "{flag}"\n', encoding="utf-8")
    proc = streams("--config", str(conf), "status", "--json", cwd=tmp_path)
    assert [s["source"] for s in json.loads(proc.stdout)] == [str(path)]
    assert not (work / ".streams").exists() and not (tmp_path / ".streams").exists()


def test_flag_beats_env_beats_config_file(tmp_path: Path) -> None:
    (tmp_path / "streams.toml").write_text('data_dir = "from-file"\n', encoding="utf-8")
    env = {"STREAMS_DATA_DIR": str(tmp_path / "from-env")}
    proc = streams("--data-dir", str(tmp_path / "from-flag"), "status", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["from-flag"]
    proc = streams("status", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["from-env", "from-flag"]
    proc = streams("status", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "from-env", "from-file", "from-flag"]
    # The config file also sets options of subcommands, and its errors name it.
    missing = streams("--config", str(tmp_path / "absent.toml"), "status", cwd=tmp_path)
    assert missing.returncode != 0 and "absent.toml" in missing.stderr
    (tmp_path / "broken.toml").write_text("data_dir = \n", encoding="utf-8")
    broken = streams("--config", str(tmp_path / "broken.toml"), "status", cwd=tmp_path)
    assert broken.returncode != 0 and "broken.toml" in broken.stderr



# -------------------------------------------------------- attributes in the S3 objects


def _s3_rows(data_dir: Path, fmt: str) -> list[dict[str, Any]]:
    root = data_dir / "s3"
    return [row for path in sorted(root.rglob(f"part-*.{fmt}"))
            for row in decode_changes(path.read_bytes(), fmt)]


@pytest.mark.parametrize("fmt", ["parquet", "avro", "jsonl"])
def test_attributes_reach_the_s3_objects_typed_from_the_file(tmp_path: Path, fmt: str) -> None:
    """Parquet input keeps its types, JSON Lines its JSON types, CSV gives text; a row
    without an attribute has null; a replace's removals carry nulls; the warehouse keeps
    memberships only."""
    when = pa.scalar(1_700_000_000_000_000, pa.timestamp("us", tz="UTC")).as_py()
    inputs = {
        "in.parquet": lambda p: pq.write_table(pa.table({
            "user_id": ["u1", "u2", "u3"], "country": ["DE", None, "FR"],
            "score": pa.array([7, 8, None], pa.int64()), "ratio": [0.5, 1.25, 2.0],
            "seen": pa.array([when, when, None], pa.timestamp("us", tz="UTC"))}), p),
        "in.jsonl": lambda p: p.write_text(
            '{"user_id": "u1", "country": "DE", "score": 7, "vip": true}\n'
            '{"user_id": "u2", "score": 8, "vip": false}\n'
            '{"user_id": "u3", "country": "FR", "vip": true}\n', encoding="utf-8"),
        "in.csv": lambda p: p.write_text("user_id,country,score\nu1,DE,7\nu2,,8\nu3,FR,\n",
                                         encoding="utf-8"),
    }
    expected = {
        "in.parquet": {"u1": {"country": "DE", "score": 7, "ratio": 0.5, "seen": when},
                       "u2": {"country": None, "score": 8, "ratio": 1.25, "seen": when},
                       "u3": {"country": "FR", "score": None, "ratio": 2.0, "seen": None}},
        "in.jsonl": {"u1": {"country": "DE", "score": 7, "vip": True},
                     "u2": {"country": None, "score": 8, "vip": False},
                     "u3": {"country": "FR", "score": None, "vip": True}},
        "in.csv": {"u1": {"country": "DE", "score": "7"}, "u2": {"country": "", "score": "8"},
                   "u3": {"country": "FR", "score": ""}},
    }
    for name, write in inputs.items():
        data = tmp_path / f"{name}-{fmt}" / "data"
        data.parent.mkdir()
        path = tmp_path / name
        write(path)
        run_cli("--s3-format", fmt, "run", str(path), "--segment", "s", "--mode", "replace",
                "-q", data_dir=data)
        rows = _s3_rows(data, fmt)
        got = {r["user_id"]: {k: r[k] for k in expected[name]["u1"]} for r in rows}
        if fmt == "jsonl" and name == "in.parquet":  # JSON has no timestamps: text
            for attrs in expected[name].values():
                if attrs["seen"] is not None:
                    attrs["seen"] = "2023-11-14 22:13:20.000000Z"
        if fmt == "avro" and name == "in.parquet":
            for attrs in got.values():  # fastavro reads timestamp-micros as aware UTC
                assert attrs["seen"] is None or attrs["seen"].tzinfo is not None
        assert got == expected[name], (name, fmt)
        # A replace that lists only u3 removes u1 and u2 at its end marker: null attributes.
        again = tmp_path / f"again-{fmt}-{name.replace('.', '-')}.csv"
        again.write_text("user_id,country\nu3,FR\n", encoding="utf-8")
        run_cli("--s3-format", fmt, "run", str(again), "--segment", "s", "--mode", "replace",
                "-q", data_dir=data)
        removals = [r for r in _s3_rows(data, fmt) if r["seq"] == -1]
        assert sorted(r["user_id"] for r in removals) == ["u1", "u2"]
        # (an object holding only removals has no attribute columns: null for its readers)
        assert all(r.get("country") is None for r in removals)
        con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
        try:
            columns = [c[0] for c in con.execute("DESCRIBE segment_members").fetchall()]
        finally:
            con.close()
        assert columns == ["segment_id", "user_id", "batch_id", "updated_seq"]


def test_files_without_attributes_write_no_attribute_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [("u1", "s", "add"), ("u2", "s", "add")])
    data = tmp_path / "data"
    run_cli("run", str(path), "-q", data_dir=data)
    objects = list((data / "s3").rglob("part-*.parquet"))
    assert objects
    for obj in objects:
        assert pq.read_schema(obj).names == ["batch_id", "partition", "user_id", "segment_id",
                                             "op", "seq", "source_position", "part"]

"""The embedded log's housekeeping against real files: segments rolled at segment_bytes,
retention by age and size (whole segments deleted, space freed, positions kept), readers
and consumers around deleted history, compaction (last record per key, positions kept,
keyless records refused), topic config in topic.json, and old one-file data dirs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_embedded_log import (
    HEADER,
    LineReader,
    Recorder,
    kill,
    make_frame,
    produce,
    spawn,
    wait_until,
)
from topics.backends.embedded.log import DEFAULT_CONFIG, EmbeddedLog
from topics.log import Message, TopicError, TopicPartition
from topics.spec import DAY_MS, SPECS, TopicSpec

HOUR_MS = 3600 * 1000
FRAME = HEADER.size + 3 + 100  # a frame of key "kNN" and a 100-byte value
SEGMENT = 10 * FRAME  # ten frames a segment


def items(n: int, start: int = 0) -> list[tuple[bytes | None, bytes]]:
    return [(f"k{i % 100:02d}".encode(), f"{i:05d}".encode() * 20) for i in range(start, n)]


def topic_dir(lg: EmbeddedLog, topic: str) -> Path:
    return lg.root / "log" / topic


def segment_files(lg: EmbeddedLog, topic: str, partition: int = 0) -> list[str]:
    """The partition's segment file names, oldest (lowest base) first."""
    names = [p.name for p in topic_dir(lg, topic).iterdir()
             if p.name.startswith(f"{partition}.") and p.suffix in (".log", ".compacted")]
    return sorted(names, key=lambda n: 0 if n == f"{partition}.log" else int(n.split(".")[1]))


def age(path: Path, ms: int) -> None:
    """Makes a segment's last append `ms` older (a segment's age is its mtime)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - ms * 1_000_000))


def deleted_fds_under(folder: Path) -> list[str]:
    """This process's descriptors still open on deleted files under `folder`."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)) and target.endswith(" (deleted)"):
            out.append(target)
    return out


@pytest.fixture
def log(tmp_path: Path):
    lg = EmbeddedLog(tmp_path / "data", auto_housekeep=False)  # the tests call housekeep()
    lg.ensure_topics([TopicSpec("seg", 1, (), segment_bytes=SEGMENT),
                      TopicSpec("kv", 1, (), cleanup="compact", segment_bytes=SEGMENT)])
    yield lg
    lg.close()


def msgs(lg: EmbeddedLog, topic: str, after: int | None = None) -> list[Message]:
    return list(lg.read(topic, 0, after))


# -- segments and config -----------------------------------------------------------------

def test_segments_roll_at_segment_bytes_and_positions_stay_byte_offsets(
        log: EmbeddedLog) -> None:
    produce(log, "seg", 0, items(35))
    assert segment_files(log, "seg") == [
        "0.log", "0.00000000000000001210.log", "0.00000000000000002420.log",
        "0.00000000000000003630.log"]
    got = msgs(log, "seg")
    assert [(m.key, m.value) for m in got] == items(35)
    assert [m.position for m in got] == [i * FRAME for i in range(35)]
    # reads across segment boundaries, from any position, through a fresh handle too
    for reader in (log, EmbeddedLog(log.root)):
        for i in (0, 9, 10, 19, 33):
            assert [m.position for m in msgs(reader, "seg", got[i].position)] == [
                m.position for m in got[i + 1:]]
        assert reader.read_at("seg", 0, got[20].position) == got[20]
    info = log.describe("seg")[0]
    assert (info.first_position, info.last_position, info.messages) == (0, 34 * FRAME, 35)


def test_ensure_topics_writes_config_and_an_existing_topic_keeps_its_own(
        log: EmbeddedLog) -> None:
    meta = json.loads((topic_dir(log, "kv") / "topic.json").read_text())
    assert meta == {"partitions": 1, "changelog": False, "cleanup": "compact",
                    "retention_ms": None, "retention_bytes": None, "segment_bytes": SEGMENT}
    log.set_topic_config("seg", retention_ms=HOUR_MS)
    log.ensure_topics([TopicSpec("seg", 1, ())])  # the spec's defaults do not undo it
    assert EmbeddedLog(log.root).topic_config("seg")["retention_ms"] == HOUR_MS
    with pytest.raises(TopicError, match="cleanup"):
        log.set_topic_config("seg", cleanup="shred")
    with pytest.raises(TopicError, match="retention_bytes"):
        log.set_topic_config("seg", retention_bytes=0)
    with pytest.raises(ValueError, match="retention_ms"):
        TopicSpec("bad", 1, (), retention_ms=-5)


def test_changelog_specs_expire_instead_of_compacting() -> None:
    changelogs = [s for s in SPECS.values() if s.changelog]
    assert changelogs
    for spec in changelogs:
        assert (spec.cleanup, spec.retention_ms) == ("delete", 7 * DAY_MS)
    assert all(s.retention_ms is None for s in SPECS.values() if not s.changelog)


# -- retention ---------------------------------------------------------------------------

def test_retention_ms_deletes_old_segments_frees_disk_and_keeps_positions(
        log: EmbeddedLog) -> None:
    produce(log, "seg", 0, items(35))
    before = msgs(log, "seg")
    log.set_topic_config("seg", retention_ms=HOUR_MS)
    folder = topic_dir(log, "seg")
    files = segment_files(log, "seg")
    for name in ("0.log", "0.00000000000000001210.log"):
        age(folder / name, 2 * HOUR_MS)
    reader = EmbeddedLog(log.root)  # another handle holding the old segments open
    assert len(msgs(reader, "seg")) == 35
    disk = sum((folder / f).stat().st_size for f in files)

    done = log.housekeep()
    assert [(d["topic"], d["base"], d["reason"]) for d in done["deleted"]] == [
        ("seg", 0, "retention_ms"), ("seg", 10 * FRAME, "retention_ms")]
    assert done["freed_bytes"] == 20 * FRAME
    assert segment_files(log, "seg") == files[2:]
    assert sum((folder / f).stat().st_size for f in segment_files(log, "seg")) == disk - 20 * FRAME

    for lg in (log, reader, EmbeddedLog(log.root)):
        assert msgs(lg, "seg") == before[20:]  # same positions, same contents
        assert lg.describe("seg")[0].first_position == 20 * FRAME
        assert lg.describe("seg")[0].messages == 15
        with pytest.raises(TopicError, match="no message at position"):
            lg.read_at("seg", 0, before[3].position)
        assert msgs(lg, "seg", after=before[3].position) == before[20:]
    # the handle that had them open let go of them once it read on: the space is free
    assert deleted_fds_under(folder) == []
    assert log.housekeep()["deleted"] == []  # nothing more is old


def test_the_whole_partition_expires_and_positions_are_never_reused(log: EmbeddedLog) -> None:
    produce(log, "seg", 0, items(15))
    end = log.file(TopicPartition("seg", 0)).size()
    log.set_topic_config("seg", retention_ms=HOUR_MS)
    done = log.housekeep(now_ms=int(time.time() * 1000) + 2 * HOUR_MS)
    assert [d["base"] for d in done["deleted"]] == [0, 10 * FRAME]  # the active one too
    assert msgs(log, "seg") == []
    info = log.describe("seg")[0]
    assert (info.first_position, info.messages) == (None, 0)
    produce(log, "seg", 0, [(b"k", b"after")])
    assert [(m.position, m.value) for m in msgs(EmbeddedLog(log.root), "seg")] == [
        (end, b"after")]


def test_retention_bytes_keeps_the_newest_segments_within_the_limit(log: EmbeddedLog) -> None:
    produce(log, "seg", 0, items(45))
    log.set_topic_config("seg", retention_bytes=25 * FRAME)
    done = log.housekeep()
    # 45 frames in 5 segments; deleting the oldest two leaves 25 frames, a third would
    # leave 15 < 25
    assert [(d["base"], d["reason"]) for d in done["deleted"]] == [
        (0, "retention_bytes"), (10 * FRAME, "retention_bytes")]
    assert [m.position for m in msgs(log, "seg")] == [i * FRAME for i in range(20, 45)]


def test_producer_housekeeps_a_partition_when_it_rolls_a_segment(log: EmbeddedLog) -> None:
    log.set_topic_config("seg", retention_bytes=20 * FRAME)
    auto = EmbeddedLog(log.root)
    for i in range(0, 60, 5):  # one flush per five messages: rolls happen along the way
        produce(auto, "seg", 0, items(i + 5, start=i))
        assert len(segment_files(log, "seg")) <= 3
    assert "0.log" not in segment_files(log, "seg")
    assert msgs(log, "seg")[-1].value == items(60)[-1][1]
    auto.close()


def test_consumer_whose_committed_position_expired_resumes_at_the_earliest_and_logs(
        log: EmbeddedLog, caplog: pytest.LogCaptureFixture) -> None:
    produce(log, "seg", 0, items(25))
    before = msgs(log, "seg")
    tp = TopicPartition("seg", 0)
    log.reset_group("g", {tp: before[4].position})
    log.set_topic_config("seg", retention_ms=HOUR_MS)
    age(topic_dir(log, "seg") / "0.log", 2 * HOUR_MS)
    log.housekeep()

    caplog.set_level(logging.WARNING)
    consumer = EmbeddedLog(log.root).consumer("g", ["seg"], Recorder(), member="m")
    try:
        got: list[Message] = []
        wait_until(lambda: len(got) >= 15, "the retained messages",
                   step=lambda: got.extend(consumer.poll(100, 0.02)))
        assert got == before[10:]  # Kafka's auto.offset.reset=earliest
    finally:
        consumer.close()
    assert any("no longer retained" in r.getMessage() and str(before[4].position)
               in r.getMessage() for r in caplog.records)
    # a group's lag counts only what is retained
    assert log.group_positions("g")[0].lag == 15


def test_readers_and_consumers_iterating_while_housekeeping_deletes_segments(
        log: EmbeddedLog) -> None:
    produce(log, "seg", 0, items(50))
    before = {m.position: m for m in msgs(log, "seg")}
    log.set_topic_config("seg", retention_ms=HOUR_MS)
    reading = EmbeddedLog(log.root)
    it = reading.read("seg", 0)
    first = [next(it) for _ in range(5)]
    consumer = reading.consumer("g-live", ["seg"], Recorder(), member="m")
    polled: list[Message] = []
    try:
        wait_until(lambda: len(polled) >= 12, "a few messages",
                   step=lambda: polled.extend(consumer.poll(12, 0.02)))
        # another handle (as another process would) deletes everything but the last segment
        cleaner = EmbeddedLog(log.root)
        folder = topic_dir(log, "seg")
        for name in segment_files(log, "seg")[:-1]:
            age(folder / name, 2 * HOUR_MS)
        assert len(cleaner.housekeep()["deleted"]) == 4
        rest = [*first, *it]
        wait_until(lambda: polled[-1].position == 49 * FRAME, "the consumer to reach the end",
                   step=lambda: polled.extend(consumer.poll(100, 0.02)))
    finally:
        consumer.close()
    for seen in (rest, polled):
        positions = [m.position for m in seen]
        assert positions == sorted(set(positions)), "positions rise, nothing twice"
        assert all(m == before[m.position] for m in seen), "nothing garbled"
        assert seen[-10:] == [before[p * FRAME] for p in range(40, 50)]
    assert deleted_fds_under(topic_dir(log, "seg")) == []


# -- compaction --------------------------------------------------------------------------

def test_compacted_topic_refuses_records_without_a_key(log: EmbeddedLog) -> None:
    producer = log.producer()
    with pytest.raises(ValueError, match="Compacted topic cannot accept message without key") \
            as err:
        producer.send("kv", 0, b"value")
    assert "kv[0]" in str(err.value)
    producer.send("kv", 0, b"value", b"")  # an empty key is a key
    producer.send("seg", 0, b"value")  # a delete topic takes keyless records
    producer.flush()


def last_per_key(sent: Sequence[Message]) -> list[Message]:
    last: dict[bytes | None, Message] = {}
    for m in sent:
        last[m.key] = m
    return sorted(last.values(), key=lambda m: m.position)


def test_compaction_keeps_the_last_record_per_key_at_its_position(log: EmbeddedLog) -> None:
    produce(log, "kv", 0, [(f"k{i % 7}".encode(), f"{i:05d}".encode() * 20) for i in range(40)])
    sent = msgs(log, "kv")
    closed, active = sent[:30], sent[30:]  # segments of 10; the active one is not cleaned
    reader = EmbeddedLog(log.root)
    it = reader.read("kv", 0)
    early = [next(it) for _ in range(3)]

    done = log.housekeep()
    bases = [sent[i].position for i in (0, 10, 20, 30)]  # ten frames a segment
    assert {c["base"] for c in done["compacted"]} <= set(bases[:3])
    assert sum(c["removed"] for c in done["compacted"]) == 30 - 7
    files = segment_files(log, "kv")
    assert "0.log" not in files and files[-1] == f"0.{bases[3]:020d}.log"
    want = last_per_key(closed) + active
    for lg in (log, EmbeddedLog(log.root)):
        assert msgs(lg, "kv") == want
        # a removed position: read_at refuses it, reading after it resumes at the next survivor
        with pytest.raises(TopicError):
            lg.read_at("kv", 0, sent[0].position)
        assert msgs(lg, "kv", after=sent[0].position) == [
            m for m in want if m.position > sent[0].position]
        for m in want:
            assert lg.read_at("kv", 0, m.position) == m
    # a reader that started before compaction reads one consistent version: never half
    rest = [*early, *it]
    positions = [m.position for m in rest]
    assert positions == sorted(set(positions))
    by_position = {m.position: m for m in sent}
    assert all(m == by_position[m.position] for m in rest)
    assert [m.position for m in rest if m.position >= bases[3]] == [
        m.position for m in active]
    assert log.housekeep()["compacted"] == []  # nothing new: nothing done

    # a consumer committed at a removed position resumes at the next survivor
    log.reset_group("gk", {TopicPartition("kv", 0): sent[2].position})
    consumer = log.consumer("gk", ["kv"], Recorder(), member="m")
    try:
        got: list[Message] = []
        wait_until(lambda: len(got) >= len(want) - 0 or (got and got[-1] == want[-1]),
                   "the consumer to read the compacted partition",
                   step=lambda: got.extend(consumer.poll(100, 0.02)))
        assert got == [m for m in want if m.position > sent[2].position]
    finally:
        consumer.close()


def test_compaction_runs_again_when_newer_segments_supersede_older_keys(
        log: EmbeddedLog) -> None:
    produce(log, "kv", 0, [(f"a{i}".encode(), b"x" * 100) for i in range(10)])
    produce(log, "kv", 0, [(b"zz", b"y" * 100)] * 10)  # closes segment 0
    log.housekeep()
    produce(log, "kv", 0, [(f"a{i}".encode(), b"z" * 100) for i in range(10)])
    produce(log, "kv", 0, [(b"end", b"e" * 100)])  # closes the segment of new a-values
    done = log.housekeep()
    assert any(c["base"] == 0 and c["kept"] == 0 for c in done["compacted"])
    assert "0.00000000000000000000.compacted" not in segment_files(log, "kv")
    got = msgs(log, "kv")
    assert [(m.key, m.value[:1]) for m in got] == [
        (b"zz", b"y"), *[(f"a{i}".encode(), b"z") for i in range(10)], (b"end", b"e")]


def test_compaction_crash_leftovers_are_ignored_and_cleaned(log: EmbeddedLog) -> None:
    produce(log, "kv", 0, [(b"kept", b"v" * 100)])  # segment 0 keeps a record
    produce(log, "kv", 0, [(f"k{i % 3}".encode(), b"v" * 100) for i in range(25)])
    folder = topic_dir(log, "kv")
    (folder / ".0.00000000000000000000.compacted.999.tmp").write_bytes(b"half a rewrite")
    want = msgs(log, "kv")
    assert msgs(EmbeddedLog(log.root), "kv") == want
    raw = (folder / "0.log").read_bytes()
    log.housekeep()
    assert not list(folder.glob(".*.tmp"))
    # a crash between renaming the rewrite into place and deleting the raw file
    (folder / "0.log").write_bytes(raw)
    compacted = msgs(log, "kv")
    assert compacted[0].key == b"kept" and len(compacted) < 26
    assert msgs(EmbeddedLog(log.root), "kv") == compacted
    assert not (folder / "0.log").exists()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d", b"", b"long-key" * 5]),
                          st.binary(max_size=60)), max_size=60),
       st.integers(60, 400), st.integers(1, 7))
def test_compaction_property_last_record_per_key_in_position_order(
        items_: list[tuple[bytes, bytes]], segment_bytes: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lg = EmbeddedLog(Path(tmp))
        lg.ensure_topics([TopicSpec("p", 1, (), cleanup="compact", segment_bytes=segment_bytes)])
        for start in range(0, len(items_), batch):
            produce(lg, "p", 0, items_[start : start + batch])
        sent = msgs(lg, "p")
        # a record bigger than a segment goes to a segment of its own: all before are closed
        produce(lg, "p", 0, [(b"\x00sentinel", b"s" * segment_bytes)])
        sentinel = msgs(lg, "p")[-1]
        lg.housekeep()
        assert msgs(lg, "p") == [*last_per_key(sent), sentinel]
        assert msgs(EmbeddedLog(Path(tmp)), "p") == [*last_per_key(sent), sentinel]
        lg.close()


# -- old data dirs and concurrent writers across rolls -----------------------------------

def test_old_layout_data_dir_is_read_appended_and_housekept(tmp_path: Path) -> None:
    folder = tmp_path / "log" / "old"
    folder.mkdir(parents=True)
    (folder / "topic.json").write_text(json.dumps({"partitions": 1, "changelog": True}))
    frames = [make_frame(f"m{i}".encode() * 50, f"k{i}".encode(), ts=1000 + i)
              for i in range(5)]
    (folder / "0.log").write_bytes(b"".join(frames))
    lg = EmbeddedLog(tmp_path)
    assert lg.topic_config("old") == DEFAULT_CONFIG
    got = msgs(lg, "old")
    assert [m.value for m in got] == [f"m{i}".encode() * 50 for i in range(5)]
    assert [m.timestamp_ms for m in got] == [1000 + i for i in range(5)]
    assert lg.housekeep()["deleted"] == []  # no retention: nothing happens

    # ensure_topics gives it the spec's config; it rolls and expires like any topic
    lg.ensure_topics([TopicSpec("old", 1, (), changelog=True, retention_ms=HOUR_MS,
                                segment_bytes=len(frames[0]) * 5)])
    lg2 = EmbeddedLog(tmp_path)
    assert lg2.topic_config("old")["retention_ms"] == HOUR_MS
    produce(lg2, "old", 0, [(b"new", b"new value")])
    assert segment_files(lg2, "old") == ["0.log", f"0.{5 * len(frames[0]):020d}.log"]
    age(folder / "0.log", 2 * HOUR_MS)
    lg2.housekeep()
    assert [(m.position, m.value) for m in msgs(lg2, "old")] == [
        (5 * len(frames[0]), b"new value")]
    lg.close()
    lg2.close()


def test_two_processes_append_concurrently_across_segment_rolls(tmp_path: Path) -> None:
    root = tmp_path / "data"
    lg = EmbeddedLog(root)
    lg.ensure_topics([TopicSpec("shared", 1, (), segment_bytes=256 << 10)])
    count = 1500
    procs = [spawn("writer", str(root), "shared", w, str(count), str(i), "--wait-go", stdin=True)
             for i, w in enumerate(("a", "b"))]
    readers = [LineReader(p) for p in procs]
    try:
        for r in readers:
            assert r.get(15) == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p, r in zip(procs, readers, strict=True):
            acked = r.drain()
            assert p.wait(timeout=15) == 0, p.stderr.read()  # type: ignore[union-attr]
            assert [int(x) for x in acked] == list(range(count))
    finally:
        for p in procs:
            kill(p)
    assert len(segment_files(lg, "shared")) > 10
    got = msgs(lg, "shared")
    assert len(got) == 2 * count
    for w in ("a", "b"):
        numbers = [int(m.value.split(b":")[1]) for m in got if m.value.startswith(w.encode())]
        assert numbers == list(range(count))
    # positions are byte offsets of one contiguous history across the segments
    assert all(a.position + HEADER.size + len(a.key or b"") + len(a.value) == b.position
               for a, b in itertools.pairwise(got))
    lg.close()

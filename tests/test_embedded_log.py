"""The embedded log backend against real files and real processes: frames and positions,
torn tails, SIGKILLed and concurrent writers, consumer groups, admin operations.

Child processes run this file as a script (see `_main` at the bottom), so their code is
linted and versioned with the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topics.backends.embedded.groups import GroupDir
from topics.backends.embedded.log import EmbeddedLog
from topics.backends.embedded.partition_file import READ_AHEAD, CorruptLogError
from topics.log import GroupBusyError, TopicError, TopicPartition
from topics.spec import TopicSpec

THIS = Path(__file__).resolve()
HEADER = struct.Struct("<IIqH")  # the documented frame header, re-stated independently
NO_KEY = 0xFFFF
WAIT_S = 15.0  # upper bound of every wait on a condition


# -- independent frame codec -------------------------------------------------------------

def make_frame(value: bytes, key: bytes | None = None, ts: int = 0) -> bytes:
    """A frame built from the documented layout (not with the production encoder)."""
    key_len = NO_KEY if key is None else len(key)
    body = struct.pack("<qH", ts, key_len) + (key or b"") + value
    return struct.pack("<II", len(value), zlib.crc32(body)) + body


def parse_frames(data: bytes) -> tuple[list[tuple[int, int, bytes | None, bytes]], int]:
    """Valid frames from the start of `data` as (position, ts, key, value), and the offset
    where the valid prefix ends (== len(data) for a clean file)."""
    out: list[tuple[int, int, bytes | None, bytes]] = []
    pos = 0
    while pos + HEADER.size <= len(data):
        value_len, crc, ts, key_len = HEADER.unpack_from(data, pos)
        klen = 0 if key_len == NO_KEY else key_len
        end = pos + HEADER.size + klen + value_len
        if end > len(data) or zlib.crc32(data[pos + 8 : end]) != crc:
            break
        key = None if key_len == NO_KEY else data[pos + HEADER.size : pos + HEADER.size + klen]
        out.append((pos, ts, key, data[pos + HEADER.size + klen : end]))
        pos = end
    return out, pos


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S,
               step: Callable[[], object] | None = None) -> None:
    """Polls `cond` (running `step` between checks) until it holds; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.01)


class LineReader:
    """Reads a child's stdout lines on a thread, so the test can wait on them with bounds."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def get(self, timeout: float) -> str | None:
        """The next line, None at EOF; raises queue.Empty after `timeout`."""
        return self.lines.get(timeout=timeout)

    def drain(self, timeout: float = WAIT_S) -> list[str]:
        """Every remaining line up to EOF (the child must be dead or exiting)."""
        out = []
        while (line := self.get(timeout)) is not None:
            out.append(line)
        return out


def spawn(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(THIS), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True)


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT_S)


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def log(tmp_path: Path):
    lg = EmbeddedLog(tmp_path / "data")
    lg.ensure_topics([TopicSpec("t", 4, ()), TopicSpec("one", 1, ())])
    yield lg
    lg.close()


def log_file(lg: EmbeddedLog, topic: str, partition: int) -> Path:
    return lg.root / "log" / topic / f"{partition}.log"


def produce(lg: EmbeddedLog, topic: str, partition: int,
            items: Sequence[tuple[bytes | None, bytes]]) -> None:
    producer = lg.producer()
    for key, value in items:
        producer.send(topic, partition, value, key)
    producer.flush()


class Recorder:
    """A rebalance listener that records every callback in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[int]]] = []

    def on_assigned(self, tps: Sequence[TopicPartition]) -> None:
        self.events.append(("assigned", sorted(tp.partition for tp in tps)))

    def on_revoked(self, tps: Sequence[TopicPartition]) -> None:
        self.events.append(("revoked", sorted(tp.partition for tp in tps)))


def parts(consumer) -> set[int]:
    return {tp.partition for tp in consumer.assignment()}


# -- frames, positions, reads ------------------------------------------------------------

def test_round_trip_keys_values_timestamps_and_byte_positions(log: EmbeddedLog) -> None:
    items = [(b"user-1", b"a"), (None, b""), (b"", b"empty key"), (b"k" * 300, b"v" * 1000),
             (None, bytes(range(256)))]
    before = int(time.time() * 1000)
    produce(log, "t", 2, items)
    after = int(time.time() * 1000)

    msgs = list(log.read("t", 2))
    assert [(m.key, m.value) for m in msgs] == items
    assert all(before <= m.timestamp_ms <= after for m in msgs)
    assert all((m.topic, m.partition, m.tp) == ("t", 2, TopicPartition("t", 2)) for m in msgs)

    # positions are byte offsets of the frames: sparse, increasing, starting at 0
    expected, pos = [], 0
    for key, value in items:
        expected.append(pos)
        pos += HEADER.size + len(key or b"") + len(value)
    assert [m.position for m in msgs] == expected
    assert log_file(log, "t", 2).stat().st_size == pos

    # the file is exactly the documented frames, checksums included
    frames, clean = parse_frames(log_file(log, "t", 2).read_bytes())
    assert clean == pos
    assert [(p, ts, k, v) for p, ts, k, v in frames] == [
        (m.position, m.timestamp_ms, m.key, m.value) for m in msgs]

    # other partitions are untouched
    assert all(list(log.read("t", p)) == [] for p in (0, 1, 3))


def test_read_after_resumes_after_position_and_read_at(log: EmbeddedLog) -> None:
    produce(log, "t", 0, [(f"k{i}".encode(), f"value-{i}".encode() * (i + 1)) for i in range(6)])
    msgs = list(log.read("t", 0))
    for i, m in enumerate(msgs):
        assert [x.value for x in log.read("t", 0, after=m.position)] == [
            x.value for x in msgs[i + 1 :]]
        assert log.read_at("t", 0, m.position) == m
    assert list(log.read("t", 0, after=msgs[-1].position)) == []

    # a position that is not the start of a frame, or past the end, is refused
    with pytest.raises(TopicError, match="no message at position"):
        log.read_at("t", 0, msgs[1].position + 3)
    end = log_file(log, "t", 0).stat().st_size
    with pytest.raises(TopicError, match="no message at position"):
        log.read_at("t", 0, end)


def test_read_stops_at_end_seen_when_reading_started(log: EmbeddedLog) -> None:
    produce(log, "one", 0, [(None, b"a"), (None, b"b")])
    it = log.read("one", 0)
    first = next(it)
    produce(log, "one", 0, [(None, b"c")])
    assert [first.value, *(m.value for m in it)] == [b"a", b"b"]
    assert [m.value for m in log.read("one", 0)] == [b"a", b"b", b"c"]


def test_describe_counts_and_empty_partitions(log: EmbeddedLog) -> None:
    produce(log, "t", 1, [(None, b"x")] * 3)
    produce(log, "t", 3, [(b"k", b"y")])
    info = {i.partition: i for i in log.describe("t")}
    assert sorted(info) == [0, 1, 2, 3]
    p1 = [m.position for m in log.read("t", 1)]
    assert (info[1].messages, info[1].first_position, info[1].last_position) == (3, 0, p1[-1])
    assert (info[3].messages, info[3].first_position, info[3].last_position) == (1, 0, 0)
    for empty in (0, 2):
        assert (info[empty].messages, info[empty].first_position,
                info[empty].last_position) == (0, None, None)
        assert list(log.read("t", empty)) == []
        with pytest.raises(TopicError):
            log.read_at("t", empty, 0)


def test_unknown_topic_and_partition(log: EmbeddedLog) -> None:
    with pytest.raises(TopicError, match="nope"):
        log.partitions("nope")
    with pytest.raises(TopicError):
        list(log.read("t", 4))


def test_values_larger_than_the_read_ahead(log: EmbeddedLog) -> None:
    big = [random.Random(i).randbytes(5 * 1024 * 1024) for i in range(2)]
    assert len(big[0]) > READ_AHEAD
    items = [(b"s0", b"small"), (b"b0", big[0]), (b"s1", b"small-2"), (b"b1", big[1]),
             (None, b"tail")]
    produce(log, "one", 0, items)
    msgs = list(log.read("one", 0))
    assert [(m.key, m.value) for m in msgs] == items
    assert log.read_at("one", 0, msgs[1].position).value == big[0]
    assert [m.value for m in log.read("one", 0, after=msgs[1].position)] == [
        v for _k, v in items[2:]]
    assert log.describe("one")[0].messages == 5

    # a consumer gets them too, across several polls if it must
    consumer = log.consumer("g-big", ["one"], Recorder(), member="m")
    try:
        got: list[bytes] = []
        wait_until(lambda: len(got) >= 5, "5 messages",
                   step=lambda: got.extend(m.value for m in consumer.poll(100, 0.05)))
        assert got == [v for _k, v in items]
    finally:
        consumer.close()


def test_torn_big_frame_is_never_returned(log: EmbeddedLog) -> None:
    produce(log, "one", 0, [(None, b"ok")])
    path = log_file(log, "one", 0)
    clean = path.stat().st_size
    frame = make_frame(random.Random(7).randbytes(5 * 1024 * 1024), b"big")
    with open(path, "ab") as f:
        f.write(frame[: READ_AHEAD + 1000])  # more than one read-ahead, less than the frame
    assert [m.value for m in EmbeddedLog(log.root).read("one", 0)] == [b"ok"]
    produce(log, "one", 0, [(None, b"next")])
    frames, end = parse_frames(path.read_bytes())
    assert end == path.stat().st_size
    assert [(p, v) for p, _t, _k, v in frames] == [(0, b"ok"), (clean, b"next")]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.none() | st.binary(max_size=40), st.binary(max_size=300)),
                max_size=30),
       st.integers(1, 8))
def test_round_trip_property(items: list[tuple[bytes | None, bytes]], batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lg = EmbeddedLog(Path(tmp))
        lg.ensure_topics([TopicSpec("p", 1, ())])
        for start in range(0, len(items), batch):
            produce(lg, "p", 0, items[start : start + batch])
        msgs = list(lg.read("p", 0))
        assert [(m.key, m.value) for m in msgs] == items
        assert all(a.position < b.position for a, b in itertools.pairwise(msgs))
        frames, _end = parse_frames((Path(tmp) / "log" / "p" / "0.log").read_bytes())
        assert [p for p, *_ in frames] == [m.position for m in msgs]
        lg.close()


# -- torn tails --------------------------------------------------------------------------

def _bad_checksum() -> bytes:
    frame = bytearray(make_frame(b"torn!"))
    frame[-1] ^= 0xFF
    return bytes(frame)


TAILS: dict[str, Callable[[], bytes]] = {
    "half-header": lambda: make_frame(b"torn value", b"key")[:9],
    "header-no-body": lambda: make_frame(b"torn value" * 50, b"key")[: HEADER.size + 20],
    "frame-minus-one-byte": lambda: make_frame(b"torn value", b"key")[:-1],
    "garbage": lambda: random.Random(3).randbytes(777),
    "bad-checksum": _bad_checksum,
    "huge-length": lambda: struct.pack("<IIqH", 2**31, 0, 0, NO_KEY) + b"\x01" * 100,
}


def _tail(name: str) -> bytes:
    return TAILS[name]()


@pytest.mark.parametrize("tail", sorted(TAILS))
def test_torn_tail_is_invisible_then_cut_by_next_writer(log: EmbeddedLog, tail: str) -> None:
    produce(log, "one", 0, [(b"k1", b"first"), (b"k2", b"second")])
    path = log_file(log, "one", 0)
    clean = path.stat().st_size
    with open(path, "ab") as f:
        f.write(_tail(tail))
    assert path.stat().st_size > clean

    # readers, old and new, stop before it and never return part of it
    for reader in (log, EmbeddedLog(log.root)):
        assert [m.value for m in reader.read("one", 0)] == [b"first", b"second"]
        assert reader.describe("one")[0].messages == 2
        with pytest.raises(TopicError):
            reader.read_at("one", 0, clean)

    # the next writer (a fresh process-like handle) cuts it and appends cleanly
    writer = EmbeddedLog(log.root)
    produce(writer, "one", 0, [(b"k3", b"third")])
    frames, end = parse_frames(path.read_bytes())
    assert end == path.stat().st_size
    assert [(p, v) for p, _t, _k, v in frames][2] == (clean, b"third")
    assert [m.value for m in log.read("one", 0)] == [b"first", b"second", b"third"]

    # and a writer that had already appended before the tail appeared cuts it too
    with open(path, "ab") as f:
        f.write(_tail(tail))
    produce(writer, "one", 0, [(None, b"fourth")])
    frames, end = parse_frames(path.read_bytes())
    assert end == path.stat().st_size
    assert [v for *_x, v in frames] == [b"first", b"second", b"third", b"fourth"]
    writer.close()


def test_repair_if_idle_only_without_a_writer(log: EmbeddedLog) -> None:
    produce(log, "one", 0, [(None, b"a"), (None, b"b")])
    path = log_file(log, "one", 0)
    clean = path.stat().st_size
    with open(path, "ab") as f:
        f.write(make_frame(b"partial" * 10)[:30])
    pf = EmbeddedLog(log.root).file(TopicPartition("one", 0))

    lock_fd = os.open(pf.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # a writer is active
        pf.repair_if_idle()
        assert path.stat().st_size == clean + 30  # left alone: it may be a write in flight
    finally:
        os.close(lock_fd)
    pf.repair_if_idle()
    assert path.stat().st_size == clean
    pf.repair_if_idle()  # idempotent on a clean file
    assert path.stat().st_size == clean
    assert [v for *_x, v in parse_frames(path.read_bytes())[0]] == [b"a", b"b"]


def test_consumer_never_returns_a_partial_message_and_cuts_an_idle_torn_tail(
        log: EmbeddedLog) -> None:
    produce(log, "one", 0, [(None, b"a"), (None, b"b")])
    path = log_file(log, "one", 0)
    clean = path.stat().st_size
    with open(path, "ab") as f:
        f.write(make_frame(b"partial" * 10)[:-5])
    consumer = EmbeddedLog(log.root).consumer("g-torn", ["one"], Recorder(), member="m")
    try:
        got: list[bytes] = []
        wait_until(lambda: path.stat().st_size == clean, "the consumer to cut the torn tail",
                   step=lambda: got.extend(m.value for m in consumer.poll(10, 0.02)))
        assert got == [b"a", b"b"]
        produce(log, "one", 0, [(None, b"c")])
        wait_until(lambda: len(got) == 3, "the next message",
                   step=lambda: got.extend(m.value for m in consumer.poll(10, 0.02)))
        assert got == [b"a", b"b", b"c"]
    finally:
        consumer.close()


# -- crashes and concurrency with real processes -----------------------------------------

def _numbered_value(writer: str, n: int, scale: int = 16_000) -> bytes:
    """Deterministic value of message n: its identity plus a length-varying payload."""
    size = (n * 7919) % scale
    return f"{writer}:{n}:".encode() + bytes([n % 251]) * size


def _check_numbered(msgs: list[tuple[bytes | None, bytes]], writer: str,
                    scale: int = 16_000) -> list[int]:
    numbers = []
    for key, value in msgs:
        w, n_text, _rest = value.split(b":", 2)
        if w.decode() != writer:
            continue
        n = int(n_text)
        assert key == f"{writer}-{n}".encode()
        assert value == _numbered_value(writer, n, scale), f"message {writer}:{n} is corrupt"
        numbers.append(n)
    return numbers


CRASH_SCALE = 400_000


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sigkilled_writer_keeps_every_acknowledged_message(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root = tmp_path / "data"
    EmbeddedLog(root).ensure_topics([TopicSpec("crash", 1, ())])
    # big values make the kill land inside a write (a torn tail) now and then
    proc = spawn("writer", str(root), "crash", "w", "3000", str(seed), "--scale", str(CRASH_SCALE))
    reader = LineReader(proc)
    acked: list[int] = []
    kill_after = rng.randrange(5, 40)
    acked_bytes = 0
    try:
        # at least a few acks, and a partition bigger than one read-ahead, as in real use
        while len(acked) < kill_after or acked_bytes <= READ_AHEAD:
            line = reader.get(WAIT_S)
            assert line is not None, f"writer exited early: {proc.stderr.read()}"  # type: ignore[union-attr]
            acked.append(int(line))
            acked_bytes += len(_numbered_value("w", acked[-1], CRASH_SCALE))
        # Not a wait for a condition: it moves the kill off the moment right after an ack,
        # so that it lands inside a write now and then (a torn tail).
        time.sleep(rng.uniform(0, 0.03))
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    acked += [int(x) for x in reader.drain()]  # printed before the kill, still in the pipe

    lg = EmbeddedLog(root)
    msgs = [(m.key, m.value) for m in lg.read("crash", 0)]
    numbers = _check_numbered(msgs, "w", CRASH_SCALE)
    # one writer appends in order, so what survives is a prefix: every acked number, in
    # order, no duplicates (unacknowledged messages after the last ack may survive too)
    assert numbers == list(range(len(numbers)))
    assert len(numbers) >= max(acked) + 1
    assert acked == list(range(len(acked)))

    # a torn tail, if the kill landed mid-write, is cut by the next writer
    produce(lg, "crash", 0, [(b"after", b"after the crash")])
    path = log_file(lg, "crash", 0)
    frames, end = parse_frames(path.read_bytes())
    assert end == path.stat().st_size
    assert frames[-1][3] == b"after the crash"
    assert len(frames) == len(numbers) + 1, (
        f"the next writer cut {len(numbers) + 1 - len(frames)} acknowledged messages")
    lg.close()


def test_two_processes_append_concurrently(tmp_path: Path) -> None:
    root = tmp_path / "data"
    EmbeddedLog(root).ensure_topics([TopicSpec("shared", 1, ())])
    count = 1500
    procs = [spawn("writer", str(root), "shared", w, str(count), str(i), "--wait-go", stdin=True)
             for i, w in enumerate(("a", "b"))]
    readers = [LineReader(p) for p in procs]
    try:
        for r in readers:  # both started and holding their handles
            assert r.get(WAIT_S) == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p, r in zip(procs, readers, strict=True):
            acked = r.drain()
            assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()  # type: ignore[union-attr]
            assert [int(x) for x in acked] == list(range(count))
    finally:
        for p in procs:
            kill(p)

    path = root / "log" / "shared" / "0.log"
    data = path.read_bytes()
    frames, end = parse_frames(data)
    assert end == len(data), "every frame's checksum is valid, no garbage between frames"
    items = [(k, v) for _p, _t, k, v in frames]
    assert len(items) == 2 * count
    for w in ("a", "b"):
        assert _check_numbered(items, w) == list(range(count))
    writers = [v[:1] for _k, v in items]
    assert writers.count(b"a") == writers.count(b"b") == count
    assert [(m.key, m.value) for m in EmbeddedLog(root).read("shared", 0)] == items


# -- consumer groups ---------------------------------------------------------------------

def test_two_consumers_share_partitions_and_hand_over_on_close(log: EmbeddedLog) -> None:
    for p in range(4):
        produce(log, "t", p, [(None, f"p{p}-m{i}".encode()) for i in range(3)])
    rec_a, rec_b = Recorder(), Recorder()
    a = EmbeddedLog(log.root).consumer("g", ["t"], rec_a, member="a")
    b = EmbeddedLog(log.root).consumer("g", ["t"], rec_b, member="b")
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    open_consumers = {"a": a, "b": b}

    def step() -> None:
        for name, c in open_consumers.items():
            got[name] += [m.value for m in c.poll(100, 0.02)]
        if len(open_consumers) == 2:
            assert not parts(a) & parts(b), "two members own one partition at once"

    try:
        wait_until(lambda: len(parts(a)) == 2 and len(parts(b)) == 2
                   and len(got["a"]) + len(got["b"]) == 12, "a 2/2 split", step=step)
        assert parts(a) | parts(b) == {0, 1, 2, 3}
        for name, c in (("a", a), ("b", b)):
            assert {v.split(b"-")[0] for v in got[name]} == {f"p{p}".encode() for p in parts(c)}
        assert sorted(log.active_members("g")) == ["a", "b"]

        # a commits half of its first partition, then leaves
        moved = sorted(parts(a))
        tp = TopicPartition("t", moved[0])
        second = list(log.read("t", moved[0]))[1]
        a.commit({tp: second.position})
        assert a.committed(tp) == second.position
        assert b.committed(tp) == second.position
        del open_consumers["a"]
        a.close()
        assert rec_a.events[-1] == ("revoked", moved)
        assert a.assignment() == set()
        assert log.active_members("g") == ["b"]

        before = len(got["b"])
        wait_until(lambda: len(parts(b)) == 4 and len(got["b"]) - before == 1 + 3,
                   "b to take a's partitions and read on", step=step)
        assert rec_b.events[-1] == ("assigned", moved)
        # b resumed after a's commit on the first moved partition, from the start on the other
        assert sorted(got["b"][before:]) == sorted(
            [f"p{moved[0]}-m2".encode()] + [f"p{moved[1]}-m{i}".encode() for i in range(3)])
    finally:
        for c in open_consumers.values():
            c.close()
    assert log.active_members("g") == []


def test_sigkilled_consumer_loses_its_partitions_to_the_survivor(log: EmbeddedLog) -> None:
    rec = Recorder()
    survivor = log.consumer("gk", ["t"], rec, member="survivor")
    child = spawn("consumer", str(log.root), "gk", "t", "child")
    reader = LineReader(child)
    child_parts: set[int] | None = None
    try:
        def step() -> None:
            nonlocal child_parts
            survivor.poll(10, 0.02)
            try:
                while True:
                    line = reader.get(0)
                    assert line is not None, child.stderr.read()  # type: ignore[union-attr]
                    child_parts = {int(x) for x in line.split(",") if x}
            except queue.Empty:
                pass
            if child_parts is not None:
                assert not parts(survivor) & child_parts

        wait_until(lambda: child_parts is not None and len(child_parts) == 2
                   and len(parts(survivor)) == 2, "a 2/2 split with the child", step=step)
        assert sorted(log.active_members("gk")) == ["child", "survivor"]
        owners = {gp.tp.partition: gp.owner for gp in log.group_positions("gk")}
        assert owners == {p: "child" if p in child_parts else "survivor" for p in range(4)}
        lost = sorted(child_parts)  # type: ignore[arg-type]

        kill(child)
        started = time.monotonic()
        wait_until(lambda: len(parts(survivor)) == 4, "the survivor to take over", timeout=5,
                   step=lambda: survivor.poll(10, 0.02))
        assert time.monotonic() - started < 5
        assert rec.events[-1] == ("assigned", lost)
        assert log.active_members("gk") == ["survivor"]
    finally:
        kill(child)
        survivor.close()


def test_commit_committed_reset_group_and_active_members(log: EmbeddedLog) -> None:
    produce(log, "t", 0, [(None, f"m{i}".encode()) for i in range(5)])
    produce(log, "t", 1, [(None, b"x")] * 3)
    positions = [m.position for m in log.read("t", 0)]
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    assert log.active_members("g2") == []

    c = log.consumer("g2", ["t"], Recorder(), member="solo")
    try:
        assert log.active_members("g2") == ["solo"]
        wait_until(lambda: len(c.assignment()) == 4, "the sole member to own everything",
                   step=lambda: c.poll(100, 0.02))
        assert c.committed(tp0) is None
        c.commit({tp0: positions[1]})
        assert c.committed(tp0) == positions[1]
        lag = {gp.tp.partition: gp for gp in log.group_positions("g2")}
        assert (lag[0].committed, lag[0].lag, lag[0].owner) == (positions[1], 3, "solo")
        assert (lag[1].committed, lag[1].lag) == (None, 3)
        assert (lag[2].lag, lag[3].lag) == (0, 0)
        assert "g2" in log.groups()

        # seek_after re-reads from a chosen position
        c.seek_after(tp0, positions[2])
        assert [m.value for m in c.poll(100, 0.05) if m.partition == 0] == [b"m3", b"m4"]

        with pytest.raises(GroupBusyError, match="solo"):
            log.reset_group("g2", {tp0: None})
        assert c.committed(tp0) == positions[1]
    finally:
        c.close()

    assert log.active_members("g2") == []
    log.reset_group("g2", {tp0: positions[3], tp1: None})
    lag = {gp.tp.partition: gp for gp in log.group_positions("g2")}
    assert (lag[0].committed, lag[0].lag, lag[0].owner) == (positions[3], 1, None)
    assert (lag[1].committed, lag[1].lag) == (None, 3)

    # a new member resumes from the reset positions
    c2 = log.consumer("g2", ["t"], Recorder(), member="again")
    try:
        got: list[bytes] = []
        wait_until(lambda: len(got) == 4, "4 messages",
                   step=lambda: got.extend(m.value for m in c2.poll(100, 0.02)))
        assert sorted(got) == [b"m4", b"x", b"x", b"x"]
    finally:
        c2.close()


def test_member_id_is_exclusive(log: EmbeddedLog) -> None:
    c = log.consumer("g3", ["t"], Recorder(), member="same")
    try:
        with pytest.raises(RuntimeError, match="already running"):
            log.consumer("g3", ["t"], Recorder(), member="same")
    finally:
        c.close()


def test_member_joining_while_another_member_sweeps_stays_visible(
        log: EmbeddedLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """BUG: `live_members` unlinks lock files it can lock. A member that has created its
    lock file but not flocked it yet (join = open, then flock) has the file unlinked under
    it, flocks an orphaned inode and becomes invisible: `active_members` misses it and
    `reset_group` / replay proceed while it runs."""
    import topics.backends.embedded.groups as groups

    sweeper = GroupDir(log.root, "g4")
    real_flock = fcntl.flock
    armed = [True]

    def flock_after_a_sweep(fd: int, op: int) -> None:
        if armed[0]:
            armed[0] = False
            sweeper.live_members()  # another member's rebalance runs between open and flock
        real_flock(fd, op)

    monkeypatch.setattr(groups.fcntl, "flock", flock_after_a_sweep)
    consumer = log.consumer("g4", ["t"], Recorder(), member="joiner")
    monkeypatch.undo()
    try:
        assert log.active_members("g4") == ["joiner"]
        with pytest.raises(GroupBusyError):
            log.reset_group("g4", {TopicPartition("t", 0): None})
    finally:
        consumer.close()


# -- admin: topics and truncation --------------------------------------------------------

def test_ensure_topics_refuses_other_partition_counts(log: EmbeddedLog) -> None:
    log.ensure_topics([TopicSpec("t", 4, ())])  # same spec again: fine
    with pytest.raises(TopicError) as err:
        log.ensure_topics([TopicSpec("t", 3, ())])
    assert "4" in str(err.value) and "3" in str(err.value) and "t" in str(err.value)
    assert log.partitions("t") == [0, 1, 2, 3]
    with pytest.raises(TopicError, match="6"):
        EmbeddedLog(log.root).ensure_topics([TopicSpec("one", 6, ())])


def test_new_writer_keeps_a_partition_bigger_than_the_read_ahead(log: EmbeddedLog) -> None:
    """BUG: `_repair_tail` verifies the frames past its clean end with `_frames(...)`, whose
    byte budget defaults to READ_AHEAD (4 MiB), and truncates where the scan stopped. A
    writer that starts on a partition holding more than 4 MiB (any new process: a restarted
    importer or worker) cuts every acknowledged message past the first ~4 MiB."""
    produce(log, "one", 0, [(None, f"{i}:".encode() + b"x" * 50_000) for i in range(100)])
    assert log_file(log, "one", 0).stat().st_size > READ_AHEAD
    produce(EmbeddedLog(log.root), "one", 0, [(None, b"new")])
    values = [m.value for m in EmbeddedLog(log.root).read("one", 0)]
    count = len(values)
    assert count == 101, f"{101 - count} acknowledged messages were cut"
    assert values[-1] == b"new"


def test_writer_keeps_more_than_the_read_ahead_appended_by_another_writer(
        log: EmbeddedLog) -> None:
    """The same bug with two live writers: the one that appended first re-verifies the other
    one's frames from its own clean end, only 4 MiB of them, and cuts the rest."""
    first, second = EmbeddedLog(log.root), EmbeddedLog(log.root)
    produce(first, "one", 0, [(None, b"first")])
    produce(second, "one", 0, [(None, f"{i}:".encode() + b"y" * 50_000) for i in range(100)])
    produce(first, "one", 0, [(None, b"first again")])
    count = sum(1 for _m in log.read("one", 0))
    assert count == 102, f"{102 - count} acknowledged messages were cut"


def test_consumer_repairing_a_torn_tail_keeps_a_big_partition(log: EmbeddedLog) -> None:
    """The same bug through a reader: a consumer that finds a torn tail calls
    `repair_if_idle`, which scans 4 MiB from 0 and cuts the partition there."""
    produce(log, "one", 0, [(None, f"{i}:".encode() + b"z" * 50_000) for i in range(100)])
    path = log_file(log, "one", 0)
    clean = path.stat().st_size
    with open(path, "ab") as f:
        f.write(make_frame(b"torn")[:-1])
    consumer = EmbeddedLog(log.root).consumer("g-big-torn", ["one"], Recorder(), member="m")
    try:
        got: list[bytes] = []
        wait_until(lambda: path.stat().st_size <= clean, "the torn tail to be cut",
                   step=lambda: got.extend(m.value for m in consumer.poll(1000, 0.02)))
        size = path.stat().st_size
        assert size == clean, f"cut {clean - size} bytes of complete frames"
        assert len(got) == 100
    finally:
        consumer.close()


def test_key_of_65535_bytes_is_kept_or_refused(log: EmbeddedLog) -> None:
    """BUG: the key length is a u16 whose 0xFFFF means "no key", so a 65535-byte key is
    written as "no key" and the frame's length is wrong: the acknowledged message and every
    later one are unreadable (and cut off by the next writer). 65536+ bytes die with a bare
    struct.error. Such keys should be refused with a clear error at `send`."""
    producer = log.producer()
    try:
        producer.send("one", 0, b"v", b"k" * 65535)
    except ValueError:
        pass  # refused: fine
    else:
        producer.send("one", 0, b"next", b"k")
        producer.flush()
        assert [(len(m.key or b""), m.value) for m in log.read("one", 0)] == [
            (65535, b"v"), (1, b"next")]
    with pytest.raises(ValueError, match="key"):
        log.producer().send("one", 0, b"v", b"k" * 65536)


def test_corrupt_frame_in_the_middle_is_not_silently_cut(log: EmbeddedLog) -> None:
    """BUG: a frame with a bad checksum in the MIDDLE of a partition is treated as a torn
    tail: readers stop there without error (hiding every later message) and the next
    append, or a consumer's `repair_if_idle`, truncates every acknowledged message after
    it. CorruptLogError exists for exactly this case but no caller can raise it."""
    produce(log, "one", 0, [(None, f"m{i}".encode() * 20) for i in range(4)])
    path = log_file(log, "one", 0)
    msgs = list(log.read("one", 0))
    data = bytearray(path.read_bytes())
    data[msgs[1].position + HEADER.size + 5] ^= 0xFF  # one flipped bit-rot byte in m1
    path.write_bytes(bytes(data))
    size = len(data)

    with pytest.raises(CorruptLogError):
        list(EmbeddedLog(log.root).read("one", 0))
    # refusing to append to a corrupt partition is fine; cutting it is not
    with contextlib.suppress(CorruptLogError):
        produce(EmbeddedLog(log.root), "one", 0, [(None, b"more")])
    assert path.read_bytes()[:size] == bytes(data), (
        "acknowledged messages after the bad frame were cut")


# -- child processes ---------------------------------------------------------------------

def _writer(root: str, topic: str, name: str, count: int, seed: int, wait_go: bool,
            scale: int) -> None:
    rng = random.Random(seed)
    lg = EmbeddedLog(Path(root))
    producer = lg.producer()
    lg.file(TopicPartition(topic, 0))
    if wait_go:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return
    n = 0
    while n < count:
        batch = list(range(n, min(count, n + rng.randrange(1, 25))))
        for i in batch:
            producer.send(topic, 0, _numbered_value(name, i, scale), f"{name}-{i}".encode())
        producer.flush()  # acknowledged from here on
        print("\n".join(map(str, batch)), flush=True)
        n = batch[-1] + 1


def _consumer(root: str, group: str, topic: str, member: str) -> None:
    lg = EmbeddedLog(Path(root))
    consumer = lg.consumer(group, [topic], Recorder(), member=member)
    last = None
    deadline = time.monotonic() + 60  # bounded even if the parent never kills us
    while time.monotonic() < deadline:
        consumer.poll(10, 0.02)
        now = ",".join(str(p) for p in sorted(parts(consumer)))
        if now != last:
            print(now, flush=True)
            last = now


def _main(argv: list[str]) -> None:
    if argv[0] == "writer":
        root, topic, name, count, seed = argv[1:6]
        scale = int(argv[argv.index("--scale") + 1]) if "--scale" in argv else 16_000
        _writer(root, topic, name, int(count), int(seed), "--wait-go" in argv, scale)
    elif argv[0] == "consumer":
        _consumer(*argv[1:5])
    else:
        raise SystemExit(f"unknown role {argv[0]}")


if __name__ == "__main__":
    _main(sys.argv[1:])

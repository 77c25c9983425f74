"""State survives the log's own housekeeping (issue 7, hole 4): the changelogs are
`cleanup.policy=delete` and a restore starts from the newest snapshot, so history the log
expired is never needed; compaction, if an operator turns it on, can drop nothing (every
changelog message has a key of its own); and where history expired with no snapshot to
cover it, a restore says so instead of restoring a part of the state."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from streams.pipeline import ROLES, Pipeline
from streams.settings import Settings
from streams.state.recovery import HistoryLost
from tests.support import expected_members, random_rows, write_csv
from topics.backends.embedded.log import EmbeddedLog
from topics.spec import BATCHES_CHANGELOG, SEGMENTS_CHANGELOG

CHANGELOGS = (SEGMENTS_CHANGELOG, BATCHES_CHANGELOG)
DAY_MS = 86_400_000


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", chunk_rows=500, message_rows=300,
                    checkpoint_interval_s=0.05)


def _run(settings: Settings, path: Path, mode: str = "add") -> str:
    pipe = Pipeline(settings)
    try:
        result = pipe.importer().run(pipe.import_request(str(path), mode=mode))
        worker = pipe.worker(ROLES, member="test")

        def closed() -> bool:
            status = pipe.batches().get(result.batch_id)
            return status is not None and status.finished

        assert worker.run(until=closed, timeout_s=120), "the batch did not finish"
        assert pipe.batches()[result.batch_id].status == "closed"
        return result.batch_id
    finally:
        pipe.close()


def _small_segments(settings: Settings) -> EmbeddedLog:
    """The changelogs roll every 16 KiB, so housekeeping has closed segments to work on."""
    Pipeline(settings).close()  # creates the topics
    log = EmbeddedLog(settings.data_dir / "log")
    for topic in CHANGELOGS:
        log.set_topic_config(topic, segment_bytes=16 << 10)
    return log


def _expire_everything(log: EmbeddedLog) -> int:
    """Retention of an hour, judged a day from now: every segment of the changelogs goes."""
    for topic in CHANGELOGS:
        log.set_topic_config(topic, retention_ms=3_600_000)
    removed = log.housekeep(now_ms=int(time.time() * 1000) + DAY_MS)
    return len([d for d in removed["deleted"] if d["topic"] in CHANGELOGS])


def _check(settings: Settings, history: list[tuple[str, list[tuple[str, str, str]]]]) -> None:
    pipe = Pipeline(settings)
    try:
        assert set(pipe.warehouse.members()) == expected_members(history)
        report = pipe.verify()
        assert report.ok, [str(d) for d in report.differences[:10]] + report.problems
    finally:
        pipe.close()


def test_state_is_restored_after_its_changelog_history_expired(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    log = _small_segments(settings)
    first = random_rows(6000, users=2000, segments=2, seed=1)
    second = random_rows(3000, users=2000, segments=2, seed=2)
    _run(settings, write_csv(tmp_path / "first.csv", first))
    assert _expire_everything(log) > 0
    for topic in CHANGELOGS:  # nothing of the changelogs is left to restore from
        assert all(info.messages == 0 for info in log.describe(topic))
    _run(settings, write_csv(tmp_path / "second.csv", second), mode="replace")
    _check(settings, [("add", first), ("replace", second)])
    log.close()


def test_a_restore_that_needs_expired_history_says_so(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    log = _small_segments(settings)
    _run(settings, write_csv(tmp_path / "first.csv", random_rows(6000, 2000, 2, seed=3)))
    shutil.rmtree(settings.state_path)  # the snapshots are gone too
    _expire_everything(log)
    log.close()
    # the changelogs keep some of the history (it was checkpointed after the expiry);
    # restores fail loudly either way
    pipe = Pipeline(settings)
    try:
        with pytest.raises(HistoryLost):
            pipe.batches()
    finally:
        pipe.close()


def test_state_is_restored_after_compaction_ran_on_the_changelogs(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    log = _small_segments(settings)
    first = random_rows(6000, users=2000, segments=2, seed=4)
    _run(settings, write_csv(tmp_path / "first.csv", first))
    shutil.rmtree(settings.state_path)  # restore from the changelogs alone
    for topic in CHANGELOGS:
        log.set_topic_config(topic, cleanup="compact")
    compacted = log.housekeep()["compacted"]
    assert [c for c in compacted if c["topic"] in CHANGELOGS]
    assert all(c["removed"] == 0 for c in compacted)  # no two messages share a key
    second = random_rows(3000, users=2000, segments=2, seed=5)
    _run(settings, write_csv(tmp_path / "second.csv", second), mode="replace")
    _check(settings, [("add", first), ("replace", second)])
    log.close()

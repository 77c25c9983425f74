"""Pure logic of the deployment, by property: S3 events parsed from both shapes name the
same object and batch, and the settings read back from the variables they are written to."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from deploy import s3_events
from streams.settings import Settings
from tests.deploy_support import eventbridge_event, s3_notification

keys = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               min_size=1, max_size=60)
heads = st.fixed_dictionaries({
    "ContentLength": st.integers(0, 1 << 40),
    "ETag": st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda t: f'"{t}"'),
    "VersionId": st.text("abcdefghijklmnopqrstuvwxyz0123456789._", min_size=0, max_size=32)})


@given(key=keys, head=heads)
def test_both_event_shapes_name_the_same_object_and_batch(key: str, head: dict) -> None:
    bridge = s3_events.parse(eventbridge_event("bucket", key, head))
    notified = s3_events.parse(s3_notification("bucket", key, head))
    assert bridge == notified.__class__(notified.bucket, notified.key, notified.size,
                                        notified.version, bridge.sequencer)
    assert (bridge.key, bridge.size) == (key, head["ContentLength"])
    assert bridge.batch_id == notified.batch_id
    assert s3_events.BATCH_ID_PATTERN.match(bridge.batch_id)
    # Without a version id, the ETag tells the versions apart (same bytes, same batch).
    expected = head["VersionId"] or head["ETag"].strip('"')
    assert bridge.version == expected


@given(key=keys, a=heads, b=heads)
def test_other_versions_are_other_batches(key: str, a: dict, b: dict) -> None:
    first = s3_events.parse(eventbridge_event("bucket", key, a))
    second = s3_events.parse(eventbridge_event("bucket", key, b))
    assert (first.batch_id == second.batch_id) == (first.version == second.version)


@given(message_rows=st.integers(1, 100_000), fsync=st.booleans(),
       interval=st.floats(0.01, 1e6, allow_nan=False),
       options=st.lists(st.from_regex(r"[a-z.]{1,10}=[a-z0-9]{1,5}", fullmatch=True),
                        max_size=3),
       timeout=st.none() | st.integers(1, 10**6), table=st.text("abc-_", max_size=10))
def test_settings_read_back_from_their_variables(message_rows: int, fsync: bool,
                                                 interval: float, options: list[str],
                                                 timeout: int | None, table: str) -> None:
    settings = Settings(data_dir=Path("/tmp/x"), message_rows=message_rows, fsync=fsync,
                        checkpoint_interval_s=interval, kafka_option=tuple(options),
                        kafka_session_timeout_ms=timeout, guard_table=table)
    assert Settings.from_env(settings.to_env()) == settings

"""The importer against the log's message size limit: messages are packed under it, and a
row too big for a message on its own is a bad row in the dead-letter topic, not a failed
import (Kafka's producer refuses values over max_request_size)."""

from __future__ import annotations

from pathlib import Path

from streams.pipeline import Pipeline
from streams.settings import Settings
from topics.codec import decode
from topics.columns import read_columns
from topics.spec import ROWS

LIMIT = 4096


def test_rows_are_packed_under_the_limit_and_an_oversize_row_is_dead_lettered(
        tmp_path: Path) -> None:
    rows = [(f"user-{i:05d}", "x" * (9000 if i == 17 else 20)) for i in range(1, 601)]
    path = tmp_path / "big.csv"
    path.write_text("user_id,segment_id,note\n"
                    + "".join(f"{u},seg-a,{note}\n" for u, note in rows), encoding="utf-8")
    pipe = Pipeline(Settings(data_dir=tmp_path / "data"))
    try:
        pipe.log.max_message_bytes = LIMIT  # as a Kafka log with max_request_size 4096
        result = pipe.importer().run(pipe.import_request(str(path), max_rejects="1"))
        assert (result.outcome, result.rows, result.rejected) == ("published", 599, 1)

        users: list[str] = []
        for partition in pipe.log.partitions(ROWS):
            for msg in pipe.log.read(ROWS, partition):
                assert len(msg.value) <= LIMIT
                schema, value = decode(msg.value)
                if schema == "AudienceRows":
                    users += read_columns(value).user_ids
                else:
                    assert value["count"] == result.partition_counts[partition]
        assert sorted(users) == [u for u, _n in rows if u != "user-00017"]

        (dead,) = list(pipe.dead_letters(result.batch_id))
        assert dead["row"] == 17 and dead["file"] == str(path)
        assert "bytes as a message, over the log's 4,096-byte message limit" in dead["reason"]
        assert dead["raw"] == "user_id='user-00017', segment_id='seg-a', attributes ['note']"
    finally:
        pipe.close()

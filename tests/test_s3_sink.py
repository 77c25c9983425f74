"""S3Sink: objects under deterministic keys and manifests that list each object once."""

from __future__ import annotations

import json
from pathlib import Path

from connectors.change_set import ChangeSet
from connectors.object_store import LocalObjectStore
from connectors.s3_sink import S3Sink


def test_s3_sink_lists_a_chunk_written_again_once(tmp_path: Path) -> None:
    """ChangeWriter's contract: writing the same chunk again changes nothing. A sink whose
    partition a rebalance revoked and gave back re-reads the open batch from its commit and
    writes its chunks again; the partition's manifest must list each object once (it
    raised "lists an object twice", and the worker died: a regression test)."""
    sink = S3Sink(LocalObjectStore(tmp_path / "s3"), "jsonl")
    chunk = ChangeSet.from_lists("b1", 0, 0, ["u1", "u2"], ["s1", "s1"], ["add", "add"], [1, 2])
    sink.write_chunk(chunk)
    sink.write_chunk(chunk)  # the batch re-read after the partition came back
    sink.close_partition("b1", 0, partitions=1, end_position=5)
    manifest = json.loads((tmp_path / "s3" / "audience" / "segment-changes" / "batch=b1"
                           / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["record_count"] == 2

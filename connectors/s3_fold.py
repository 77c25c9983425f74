"""The membership that the S3 sink's objects describe: a fold for consistency checks.

Every object that a per-partition `_manifest.json` under the prefix lists is read (any of
the three formats, as the manifest says), and its rows are applied in log order: by
(partition, source_position, part, row). That order crosses batches, which may interleave
on a partition; it is the order the segments processor folded them in, so the result
equals its members tables and the warehouse's `segment_members` (DuckDBWarehouse.members).
Objects no manifest lists (a partition not closed yet) are left out, as a COPY would. So
compare with the warehouse when no batch is open: an end marker merges the changes of the
partition's other open batches up to it too, whose objects are listed once their batch
closes there.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from urllib.parse import unquote, urlparse

from connectors.object_formats import decode_changes
from connectors.object_store import ObjectStore
from topics import positions

PARTITION_MANIFEST = "_manifest.json"
_PARTITION_DIR = re.compile(r"partition=(\d+)")

# (source_position, part, is an add, segment_id, user_id) of one row.
_Row = tuple[int, int, bool, str, str]


def fold_objects(store: ObjectStore, prefix: str) -> set[tuple[str, str]]:
    """(segment_id, user_id) of every member after applying the listed objects' changes,
    starting from no members. Raises ValueError where an object is not what its manifest
    entry says (size, row count) or a row is not of its partition."""
    base = prefix.rstrip("/") + "/"
    manifests: dict[int, list[str]] = defaultdict(list)
    for key in store.list(base):
        folder, _, name = key.rpartition("/")
        match = _PARTITION_DIR.fullmatch(folder.rpartition("/")[2])
        if name == PARTITION_MANIFEST and match:
            manifests[int(match.group(1))].append(key)
    members: set[tuple[str, str]] = set()
    # One partition at a time: a user's changes are all in one partition, and only one
    # partition's rows are held at once.
    for partition in sorted(manifests):
        rows: list[_Row] = []
        for manifest_key in manifests[partition]:
            rows += _rows_listed(store, manifest_key, partition)
        rows.sort(key=lambda r: (r[0], r[1]))  # stable: rows of a message keep their order
        for _position, _part, add, segment_id, user_id in rows:
            if add:
                members.add((segment_id, user_id))
            else:
                members.discard((segment_id, user_id))
    return members


def _rows_listed(store: ObjectStore, manifest_key: str, partition: int) -> list[_Row]:
    folder = manifest_key.rpartition("/")[0]
    manifest = json.loads(store.get(manifest_key))
    fmt = manifest["format"]
    rows: list[_Row] = []
    for entry in manifest["entries"]:
        # Objects sit beside their partition's manifest; the URL's last segment names one.
        key = f"{folder}/{unquote(urlparse(entry['url']).path).rpartition('/')[2]}"
        data = store.get(key)
        decoded = decode_changes(data, fmt)
        meta = entry["meta"]
        if (len(data), len(decoded)) != (meta["content_length"], meta["record_count"]):
            raise ValueError(f"{key}: {len(data)} bytes and {len(decoded)} rows, but "
                             f"{manifest_key} lists {meta['content_length']} bytes and "
                             f"{meta['record_count']} rows")
        for r in decoded:
            if r["partition"] != partition:
                raise ValueError(f"{key}: a row of partition {r['partition']}: {r}")
            # Objects of any writer: a position key, or an int before wide positions.
            rows.append((positions.stored(r["source_position"]), r["part"], r["op"] == "add",
                         r["segment_id"], r["user_id"]))
    return rows

"""Audience segments: user -> segments, folded from imported rows and end markers.

State per partition (both tables changelogged):
- `members`: user_id -> memberships, a tuple of (segment_id, batch_id) pairs. The batch is
  the last `replace` batch that listed the user in that segment (or the batch that added it),
  so a replace end marker removes exactly the members whose pair names another batch.
- `batches`: batch_id -> BatchProgress in this partition: the highest row seq applied (rows
  at or below it are duplicates from a re-sent import and are skipped), the rows applied, the
  changes emitted, and whether the end marker was applied.

Outputs are only real membership changes, then the end marker flows on downstream with the
count of changes, and a `partition_applied` (or `failed`) event goes to the pipeline. A
batch whose end marker counts other than what arrived (a detected loss) fails, and its
end marker still flows on with the changes made, so that the sinks write and merge what
was applied: the state is the fold of the log, and the outputs mirror it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from processors.events import batch_event
from streams.api import Input, Output, Table, TableSpec
from topics import attributes
from topics.columns import read_columns, write_columns
from topics.spec import CHANGES, ROWS, SEGMENTS_CHANGELOG

Memberships = tuple[tuple[str, str], ...]
_PAIR_SEP, _ITEM_SEP = "\x1f", "\x1e"  # control characters never pass import validation


_PAIR_TEXT: dict[tuple[str, str], str] = {}


def _pair_text(pair: tuple[str, str]) -> str:
    text = _PAIR_TEXT.get(pair)
    if text is None:
        if len(_PAIR_TEXT) > 100_000:  # pairs are (segment, batch): few, but bound it anyway
            _PAIR_TEXT.clear()
        text = _PAIR_TEXT[pair] = f"{pair[0]}{_PAIR_SEP}{pair[1]}"
    return text


def encode_memberships(value: Memberships) -> str:
    if len(value) == 1:
        return _pair_text(value[0])
    return _ITEM_SEP.join(map(_pair_text, value))


_SINGLES: dict[str, Memberships] = {}


def decode_memberships(text: str) -> Memberships:
    if not text:
        return ()
    if _ITEM_SEP not in text:
        # One membership, as most members hold: one shared value per (segment, batch), as
        # the fold shares it, so a restore of a million members makes a few tuples.
        single = _SINGLES.get(text)
        if single is None:
            if len(_SINGLES) > 100_000:  # pairs are (segment, batch): few, but bound it
                _SINGLES.clear()
            single = _SINGLES[text] = (tuple(text.split(_PAIR_SEP, 1)),)  # type: ignore[assignment]
        return single
    return tuple(tuple(item.split(_PAIR_SEP, 1)) for item in text.split(_ITEM_SEP))  # type: ignore[misc]


class _PairsOfBatch(dict[str, tuple[str, str]]):
    """The interned (segment, batch) pair per segment of one message: a plain dict lookup
    on the hot path, the interning only on a segment's first row."""

    def __init__(self, intern: Callable[[str, str], tuple[str, str]], batch_id: str):
        super().__init__()
        self._intern = intern
        self._batch_id = batch_id

    def __missing__(self, segment: str) -> tuple[str, str]:
        pair = self[segment] = self._intern(segment, self._batch_id)
        return pair


def _index_of(current: Memberships, segment: str) -> int:
    for i, (s, _batch) in enumerate(current):
        if s == segment:
            return i
    return -1


@dataclass(frozen=True, slots=True)
class BatchProgress:
    max_seq: int = 0
    applied: int = 0
    changes: int = 0
    done: bool = False


def encode_progress(p: BatchProgress) -> str:
    return f"{p.max_seq},{p.applied},{p.changes},{int(p.done)}"


def decode_progress(text: str) -> BatchProgress:
    max_seq, applied, changes, done = text.split(",")
    return BatchProgress(int(max_seq), int(applied), int(changes), done == "1")


# A replace end marker may remove most of a partition: its removals go out in messages of
# this many rows, so that none outgrows a broker's message size limit.
REMOVALS_PER_MESSAGE = 5000

MEMBERS = TableSpec("members", encode_memberships, decode_memberships)
BATCHES = TableSpec("batches", encode_progress, decode_progress)


class AudienceSegments:
    name = "segments"
    input_topic = ROWS
    changelog_topic = SEGMENTS_CHANGELOG
    tables = (MEMBERS, BATCHES)

    def __init__(self) -> None:
        # Interning the (segment, batch) pairs: one million members of one segment share one
        # pair object, which is most of the memory a membership would otherwise take.
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}
        self._singles: dict[tuple[str, str], Memberships] = {}

    def process(self, tables: dict[str, Table[Any]], record: Input) -> list[Output]:
        if record.schema == "AudienceRows":
            return self._rows(tables["members"], tables["batches"], record)
        if record.schema == "EndMarker":
            return self._end_marker(tables["members"], tables["batches"], record)
        raise ValueError(f"{self.input_topic}: unexpected schema {record.schema}")

    def on_error(self, record: Input, error: str) -> list[Output]:
        """A message that raised (its writes are rolled back, it is dead-lettered): its
        batch fails, saying why."""
        batch_id = record.value.get("batch_id")
        if not batch_id:
            return []
        return [batch_event(batch_id, "failed", record.timestamp_ms, partition=record.partition,
                            step="segments", error=error)]

    def _pair(self, segment: str, batch_id: str) -> tuple[str, str]:
        key = (segment, batch_id)
        return self._pairs.setdefault(key, key)

    def _single(self, pair: tuple[str, str]) -> Memberships:
        """The one-membership value of a pair, shared by every user holding only it."""
        single = self._singles.get(pair)
        if single is None:
            single = self._singles[pair] = (pair,)
        return single

    def _rows(self, members: Table[Memberships], batches: Table[BatchProgress],
              record: Input) -> list[Output]:
        v = record.value
        batch_id = v["batch_id"]
        progress = batches.get(batch_id) or BatchProgress()
        if progress.done:
            return []  # the batch is closed here: a re-sent import changes nothing
        max_seq, applied = progress.max_seq, progress.applied
        reaffirm = v["mode"] == "replace"
        out_users: list[str] = []
        out_segments: list[str] = []
        out_ops: list[str] = []
        out_seqs: list[int] = []
        out_user, out_segment = out_users.append, out_segments.append
        out_op, out_seq = out_ops.append, out_seqs.append
        get, put, drop = members.get, members.set, members.delete
        pair_of = _PairsOfBatch(self._pair, batch_id)  # segment -> its (segment, batch) pair
        rows = read_columns(v)
        for seq, user, segment, op in zip(rows.seqs, rows.user_ids, rows.segment_ids, rows.ops,
                                          strict=True):
            if seq <= max_seq:
                continue  # a duplicate delivery of a row already applied
            max_seq = seq
            applied += 1
            current = get(user)
            if current is None:  # the common case of a large import: a new user
                if op != "add":
                    continue
                pair = pair_of[segment]
                put(user, self._single(pair))
            else:
                index = _index_of(current, segment)
                if op == "add":
                    if index >= 0:
                        if reaffirm and current[index][1] != batch_id:
                            # A replace batch re-affirms a member so its end marker keeps it.
                            pair = pair_of[segment]
                            put(user, (*current[:index], pair, *current[index + 1 :]))
                        continue
                    pair = pair_of[segment]
                    put(user, (*current, pair))
                elif index < 0:
                    continue
                elif len(current) > 1:
                    put(user, current[:index] + current[index + 1 :])
                else:
                    drop(user)
            out_user(user)
            out_segment(segment)
            out_op(op)
            out_seq(seq)
        batches.set(batch_id, BatchProgress(max_seq, applied, progress.changes + len(out_users)))
        if not out_users:
            return []
        attrs = None
        if v.get(attributes.FIELD) is not None or v.get("attributes"):
            # Only for files with attributes: the rows that became changes, by their seq
            # (unique in a message), so the loop above stays as it is for the rest.
            index_of = {seq: i for i, seq in enumerate(rows.seqs)}
            attrs = attributes.pack(attributes.take(attributes.read(v, len(rows)),
                                                    [index_of[seq] for seq in out_seqs]))
        return [self._changes(record, batch_id, out_users, out_segments, out_ops, out_seqs,
                              attrs=attrs)]

    def _end_marker(self, members: Table[Memberships], batches: Table[BatchProgress],
                    record: Input) -> list[Output]:
        m = record.value
        batch_id, partition = m["batch_id"], record.partition
        progress = batches.get(batch_id) or BatchProgress()
        if progress.done:
            return []
        if progress.applied != m["count"]:
            batches.set(batch_id, BatchProgress(progress.max_seq, progress.applied,
                                                progress.changes, done=True))
            error = (f"partition {partition} of {self.input_topic} holds {progress.applied} "
                     f"records of batch {batch_id} but its end marker says {m['count']}")
            # No replace removals: what the batch lists here is incomplete.
            return [self._end_marker_out(record, m, progress.changes),
                    batch_event(batch_id, "failed", record.timestamp_ms, partition=partition,
                                step="segments", error=error)]
        outputs: list[Output] = []
        removed = self._replace(members, batch_id, m["segments"]) if m["mode"] == "replace" else []
        for part, start in enumerate(range(0, len(removed), REMOVALS_PER_MESSAGE)):
            chunk = removed[start : start + REMOVALS_PER_MESSAGE]
            outputs.append(self._changes(record, batch_id, [u for u, _s in chunk],
                                         [s for _u, s in chunk], ["remove"] * len(chunk),
                                         [-1] * len(chunk), part))
        changes = progress.changes + len(removed)
        batches.set(batch_id, BatchProgress(progress.max_seq, progress.applied, changes, True))
        outputs.append(self._end_marker_out(record, m, changes))
        outputs.append(batch_event(batch_id, "partition_applied", record.timestamp_ms,
                                   partition=partition, rows=progress.applied, changes=changes))
        return outputs

    def _replace(self, members: Table[Memberships], batch_id: str,
                 segments: list[str]) -> list[tuple[str, str]]:
        """Removes this partition's members of `segments` that the batch did not list."""
        named = set(segments)
        removed: list[tuple[str, str]] = []
        updates: list[tuple[str, Memberships]] = []
        for user, current in members.items():
            keep = tuple(p for p in current if p[0] not in named or p[1] == batch_id)
            if len(keep) != len(current):
                removed.extend((user, s) for s, b in current if s in named and b != batch_id)
                updates.append((user, keep))
        for user, keep in updates:  # not while iterating the table
            if keep:
                members.set(user, keep)
            else:
                members.delete(user)
        removed.sort()  # a deterministic order, whatever the store's iteration order
        return removed

    @staticmethod
    def _end_marker_out(record: Input, marker: dict[str, Any], changes: int) -> Output:
        """The end marker downstream: how many changes of the batch came before it."""
        return Output(CHANGES, "EndMarker", {
            **marker, "count": changes, "source_position": record.position},
            partition=record.partition)

    @staticmethod
    def _changes(record: Input, batch_id: str, users: list[str], segments: list[str],
                 ops: list[str], seqs: list[int], part: int = 0,
                 attrs: bytes | None = None) -> Output:
        """`attrs`: the changes' attribute columns (packed); a replace's removals have none."""
        return Output(CHANGES, "SegmentChanges", {
            "batch_id": batch_id, "source_position": record.position, "part": part,
            **write_columns(seqs, users, segments, ops), attributes.FIELD: attrs},
            partition=record.partition)

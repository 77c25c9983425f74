"""The local store of one partition: one dict per state table, plus what changed since the
last checkpoint. The changelog is the durable copy; this is the working copy.

Writes are transactional per input message (the Quix Streams model: store -> partition ->
transaction). `begin()` opens a transaction; every first write of a key in it records the
key's previous value in an undo log; `commit()` forgets the undo log and `rollback()` puts
the values back. An undo log instead of a write buffer keeps reads on the hot path a plain
dict lookup, and a failed message's writes never reach a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from streams.api import TableSpec

_ABSENT = object()
Undo = dict[str, Any]  # key -> its value before the transaction (_ABSENT: none)


class TableView:
    """One table of one partition; writes go to the store and are remembered as dirty, and
    the first write of a key in a transaction remembers its value before (the undo log).

    `get`, `set` and `delete` are bound dict methods and closures, not methods: they are the
    hot path of every fold (about a million calls for a million rows)."""

    def __init__(self, data: dict[str, Any], dirty: dict[str, Any], undo: Undo):
        self._data = data
        self.get = data.get

        def set(key: str, value: Any) -> None:
            if key not in undo:
                undo[key] = data.get(key, _ABSENT)
            data[key] = value
            dirty[key] = value

        def delete(key: str) -> None:
            if key in data:
                if key not in undo:
                    undo[key] = data[key]
                del data[key]
                dirty[key] = None

        self.set = set
        self.delete = delete

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._data.items())

    def __len__(self) -> int:
        return len(self._data)


class PartitionStore:
    def __init__(self, specs: tuple[TableSpec[Any], ...]):
        self.specs = {spec.name: spec for spec in specs}
        self.data: dict[str, dict[str, Any]] = {name: {} for name in self.specs}
        self.dirty: dict[str, dict[str, Any]] = {name: {} for name in self.specs}
        self._undo: dict[str, Undo] = {name: {} for name in self.specs}
        self.views = {name: TableView(self.data[name], self.dirty[name], self._undo[name])
                      for name in self.specs}
        self.applied: int | None = None  # last input position applied
        self.checkpointed: int | None = None  # the stamp of the last checkpoint in the log
        self.generation = 0  # the owner generation this store writes under
        self.epoch = 0  # the replay epoch its outputs carry

    def load(self, table: str, key: str, encoded: str | None) -> None:
        """Applies one changelog entry during restore (not dirty: it is already durable)."""
        if encoded is None:
            self.data[table].pop(key, None)
        else:
            self.data[table][key] = self.specs[table].decode(encoded)

    # -- transactions ------------------------------------------------------------------
    def begin(self) -> None:
        """Starts the writes of one input message (an open transaction is committed)."""
        self.commit()

    def commit(self) -> None:
        for undo in self._undo.values():
            if undo:
                undo.clear()

    def rollback(self) -> None:
        """Undoes every write since `begin`. A key it restores stays dirty, with its value
        from before: at most a changelog entry that changes nothing (the dirty mark of a key
        is always its current value, so there is nothing else to restore)."""
        for name, undo in self._undo.items():
            data, dirty = self.data[name], self.dirty[name]
            for key, value in undo.items():
                if value is _ABSENT:
                    data.pop(key, None)
                    dirty[key] = None
                else:
                    data[key] = value
                    dirty[key] = value
            undo.clear()

    def take_dirty(self) -> dict[str, list[tuple[str, str | None]]]:
        """The committed changes since the last call, encoded for the changelog, and clears
        them."""
        self.commit()
        out = {}
        for name, dirty in self.dirty.items():
            if dirty:
                encode = self.specs[name].encode
                out[name] = [(k, None if v is None else encode(v)) for k, v in dirty.items()]
                dirty.clear()
        return out

    def snapshot_entries(self) -> dict[str, list[tuple[str, str]]]:
        """Every key of every table, encoded (what a snapshot holds)."""
        return {name: [(k, self.specs[name].encode(v)) for k, v in data.items()]
                for name, data in self.data.items()}


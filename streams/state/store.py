"""The local store of one partition: one dict per state table, plus what changed since the
last checkpoint. The changelog is the durable copy; this is the working copy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from streams.api import TableSpec

_DELETED = object()


class TableView:
    """One table of one partition; writes go to the store and are remembered as dirty."""

    def __init__(self, data: dict[str, Any], dirty: dict[str, Any]):
        self._data = data
        self._dirty = dirty
        self.get = data.get  # the hot path: a bound dict method, no wrapper

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._dirty[key] = value

    def delete(self, key: str) -> None:
        if self._data.pop(key, _DELETED) is not _DELETED:
            self._dirty[key] = None

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._data.items())

    def __len__(self) -> int:
        return len(self._data)


class PartitionStore:
    def __init__(self, specs: tuple[TableSpec[Any], ...]):
        self.specs = {spec.name: spec for spec in specs}
        self.data: dict[str, dict[str, Any]] = {name: {} for name in self.specs}
        self.dirty: dict[str, dict[str, Any]] = {name: {} for name in self.specs}
        self.views = {name: TableView(self.data[name], self.dirty[name]) for name in self.specs}
        self.applied: int | None = None  # last input position applied

    def load(self, table: str, key: str, encoded: str | None) -> None:
        """Applies one changelog entry during restore (not dirty: it is already durable)."""
        if encoded is None:
            self.data[table].pop(key, None)
        else:
            self.data[table][key] = self.specs[table].decode(encoded)

    def take_dirty(self) -> dict[str, list[tuple[str, str | None]]]:
        """The changes since the last call, encoded for the changelog, and clears them."""
        out = {}
        for name, dirty in self.dirty.items():
            if dirty:
                encode = self.specs[name].encode
                out[name] = [(k, None if v is None else encode(v)) for k, v in dirty.items()]
                dirty.clear()
        return out

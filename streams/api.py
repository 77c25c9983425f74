"""What a processor is: a pure fold of (state, input value) -> (state changes, outputs).

A processor never touches a client library or the clock: the runtime hands it the decoded
value, the input position and a `Table` per state table; it returns outputs as data. That
keeps replay deterministic and lets the same processor run on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

V = TypeVar("V")


class Table(Protocol[V]):
    """One partition of a state table, inside the current transaction."""

    def get(self, key: str) -> V | None: ...

    def set(self, key: str, value: V) -> None: ...

    def delete(self, key: str) -> None: ...

    def items(self) -> Iterator[tuple[str, V]]: ...


@dataclass(frozen=True, slots=True)
class TableSpec(Generic[V]):
    """A state table and how its values are written to the changelog."""

    name: str
    encode: Callable[[V], str]
    decode: Callable[[str], V]


@dataclass(frozen=True, slots=True)
class Output:
    """A value for an output topic. `partition` None: keyed by `key` with murmur2."""

    topic: str
    schema: str
    value: dict[str, Any]
    partition: int | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Input:
    """The decoded input message handed to a processor."""

    schema: str
    value: dict[str, Any]
    partition: int
    position: int
    timestamp_ms: int


class Processor(Protocol):
    name: str
    input_topic: str
    changelog_topic: str
    tables: tuple[TableSpec[Any], ...]

    def process(self, tables: dict[str, Table[Any]], record: Input) -> list[Output]: ...

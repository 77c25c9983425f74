"""The consistency checker behind `streams verify`: fold the source topic from the start of
the log with the same processor, independently of the changelog and of every sink, and
compare what that says with the restored state tables and with what each sink holds.

Generic over the processor: the caller says how to read a set of facts (for audience
segments: (segment_id, user_id) members) out of a processor's tables and out of each
sink. A difference names the fact and where it is missing or extra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.api import Processor
from streams.state.recovery import restore
from streams.state.snapshots import SnapshotStore
from streams.state.store import PartitionStore
from streams.state.table_reader import fold_after
from topics.log import Log

Fact = tuple[str, ...]
Facts = Callable[[dict[str, dict[str, Any]]], set[Fact]]  # tables of a partition -> facts


@dataclass(frozen=True)
class Difference:
    fact: Fact
    where: str  # "state", "warehouse", "s3", ...
    problem: str  # "missing" (the source fold has it) or "extra" (it should not be there)

    def __str__(self) -> str:
        return f"{self.where}: {self.problem} {' '.join(self.fact)}"


@dataclass
class Report:
    expected: int = 0  # facts the source fold gives
    compared: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not about one fact (lag, history)

    @property
    def ok(self) -> bool:
        return not self.differences and not self.problems


def fold_source(log: Log, processor: Processor) -> dict[int, PartitionStore]:
    """Each input partition folded from its first message, outputs discarded."""
    stores = {}
    for partition in log.partitions(processor.input_topic):
        store = PartitionStore(processor.tables)
        fold_after(log, processor, partition, store)
        stores[partition] = store
    return stores


def verify(log: Log, processor: Processor, facts: Facts,
           sinks: Mapping[str, Callable[[], set[Fact]]],
           snapshots: SnapshotStore | None = None,
           only: Callable[[Fact], bool] | None = None, group: str = "") -> Report:
    """Compares the source fold with the restored state (per partition: the changelog, plus
    the inputs after its stamp, which a checkpoint writes only when they change something)
    and with each sink. `group`: the processor's consumer group, whose lag is a problem
    (the sinks cannot be complete while it is behind)."""
    keep = only or (lambda _fact: True)
    report = Report()
    expected_by_partition = fold_source(log, processor)
    expected: set[Fact] = set()
    state: set[Fact] = set()
    for partition, folded in expected_by_partition.items():
        mine = {f for f in facts(folded.data) if keep(f)}
        expected |= mine
        restored, _tail = restore(log, processor.changelog_topic, partition, processor.tables,
                                  snapshots)
        fold_after(log, processor, partition, restored)
        state |= {f for f in facts(restored.data) if keep(f)}
    for position in log.group_positions(group) if group else []:
        if position.tp.topic == processor.input_topic and position.lag:
            report.problems.append(
                f"{group} is {position.lag} message(s) behind on {position.tp} (workers still "
                "running or behind: verify once they caught up)")
    report.expected = len(expected)
    _compare(report, "state", expected, state)
    for where, read in sinks.items():
        _compare(report, where, expected, {f for f in read() if keep(f)})
    return report


def _compare(report: Report, where: str, expected: set[Fact], actual: Iterable[Fact]) -> None:
    actual = set(actual)
    report.compared.append(where)
    report.differences += [Difference(f, where, "missing") for f in sorted(expected - actual)]
    report.differences += [Difference(f, where, "extra") for f in sorted(actual - expected)]

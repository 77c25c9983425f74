"""The composition root: wires the log, the processors and the connectors together.

This is the one place in `streams/` that imports `processors/` and `connectors/`; the
runtime modules beside it know only the interfaces in `streams.api` and `topics.log`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from connectors.error_budget import ErrorBudget
from connectors.importer import Importer, ImportRequest
from processors.pipeline_state import BatchStatus, PipelineState
from processors.segments import AudienceSegments
from streams.outputs import OutputWriter
from streams.processor_task import ProcessorTask, SnapshotPolicy
from streams.replay import SinkGroup, check_stopped, plan, rewind
from streams.settings import Settings
from streams.sink_task import SinkTask
from streams.state.snapshots import SnapshotStore
from streams.state.table_reader import read_table
from streams.verify import Report, verify
from streams.warehouse_wait import open_waiting
from streams.worker import Task, Worker
from topics.backends import open_log
from topics.codec import decode
from topics.log import Log
from topics.spec import CHANGES, DEAD_LETTER, SPECS

if TYPE_CHECKING:
    from connectors.warehouses.base import Warehouse

# The sinks' modules (pyarrow, DuckDB) are imported by the roles that need them: a process
# that only imports or only runs processors starts faster without them.

PROCESSOR_ROLES = ("segments", "pipeline")
# status-table: the DynamoDB mirror of the batch table; a no-op without --status-table.
SINK_ROLES = ("s3", "warehouse", "status-table")
ROLES = PROCESSOR_ROLES + SINK_ROLES
SINKS = ("s3", "warehouse")


def group_of(role: str) -> str:
    return {"segments": "processor-segments", "pipeline": "processor-pipeline",
            "s3": "sink-s3", "warehouse": "sink-warehouse",
            "warehouse-status": "sink-warehouse-status",
            "status-table": "sink-status-table"}[role]


def group_names(roles: tuple[str, ...]) -> list[str]:
    """The consumer groups that workers of these roles join."""
    groups = [group_of(role) for role in roles]
    if "warehouse" in roles:
        groups.append(group_of("warehouse-status"))
    return groups


def check_roles(roles: tuple[str, ...]) -> None:
    """Raises ValueError naming --roles unless they are known, given once each, and some."""
    unknown = [r for r in roles if r not in ROLES]
    twice = sorted({r for r in roles if roles.count(r) > 1})
    if not roles or unknown or twice:
        what = (f"unknown role(s) {', '.join(map(repr, unknown))}" if unknown
                else f"{', '.join(twice)} given more than once" if twice else "no role")
        raise ValueError(f"--roles {','.join(roles)!r}: {what}; expected one or more of "
                         f"{', '.join(ROLES)}, each once, comma-separated")


class Pipeline:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.log: Log = open_log(settings.log_url, **settings.log_options())
        self.log.ensure_topics(list(SPECS.values()))
        self._warehouse: Warehouse | None = None
        self._snapshots: SnapshotStore | None = None

    @property
    def snapshots(self) -> SnapshotStore:
        """Partition state snapshots (restore = snapshot + changelog tail)."""
        if self._snapshots is None:
            from connectors.object_store import open_store

            # fsync as the embedded log does (--fsync): a snapshot is no more durable than
            # the log it stands for.
            self._snapshots = SnapshotStore(open_store(self.settings.state_url,
                                                       fsync=self.settings.fsync))
        return self._snapshots

    @property
    def warehouse(self) -> Warehouse:
        if self._warehouse is None:
            self._warehouse = self._open_warehouse()
        return self._warehouse

    def _open_warehouse(self) -> Warehouse:
        from connectors.warehouses import open_warehouse

        s = self.settings
        if s.warehouse_dialect != "duckdb":
            # A server: many workers write at once, each through its own bounded pool.
            options = s.warehouse_options()
            if s.warehouse_dialect == "redshift":
                # Its COPYs read the S3 sink's objects, which another worker may still write.
                from connectors.object_store import open_store

                options["exists"] = open_store(s.object_root).exists
            return open_warehouse(s.warehouse_url, **options)
        from connectors.warehouses.duckdb import is_transient

        path = s.warehouse_path
        path.parent.mkdir(parents=True, exist_ok=True)
        return open_waiting(
            lambda: open_warehouse(str(path), threads=s.warehouse_threads,
                                   memory_limit=s.warehouse_memory_limit),
            path, s.warehouse_lock_timeout_s,
            is_lock=lambda exc: exc.__cause__ is not None and is_transient(exc.__cause__))

    def import_request(self, path: str, **options: Any) -> ImportRequest:
        return ImportRequest(
            path=path, max_rejects=ErrorBudget.parse(options.pop("max_rejects", None)
                                                     or self.settings.max_rejects),
            message_rows=self.settings.message_rows, sinks=SINKS, **options)

    def importer(self, progress: Any = None, on_input_bytes: Any = None) -> Importer:
        return Importer(self.log, self.settings.spool_dir, progress, on_input_bytes,
                        self.snapshots)

    def check_status_table(self) -> None:
        """Raises ValueError naming --status-table when its DynamoDB table exists with
        another key schema (created when missing): `run` checks it before publishing, as
        its sinks' child worker would find it only after the import."""
        if self.settings.status_table:
            from connectors.dynamo_status import StatusTable

            StatusTable(self.settings.status_table)

    def worker(self, roles: tuple[str, ...] = ROLES, member: str = "") -> Worker:
        check_roles(roles)
        if "warehouse" in roles:
            # Before any task joins a group: a process waiting for the warehouse's lock
            # must not hold partitions (of the s3 sink) that it does not process.
            _ = self.warehouse
        member = member or f"{socket.gethostname()}-{os.getpid()}"
        out = OutputWriter(self.log, self.log.producer())
        s = self.settings
        partitions = len(self.log.partitions(CHANGES))
        tasks: list[Task] = []
        if set(roles) & set(SINK_ROLES):
            import pyarrow as pa

            # The sinks build Arrow tables chunk after chunk; the system allocator gives the
            # memory back, where Arrow's default pool keeps ~50 MB more resident.
            pa.set_memory_pool(pa.system_memory_pool())
        policy = SnapshotPolicy(s.snapshot_bytes, s.snapshot_interval_s)
        for role in roles:
            if role in PROCESSOR_ROLES:
                processor = AudienceSegments() if role == "segments" else PipelineState()
                tasks.append(ProcessorTask(
                    self.log, processor, out, group_of(role), member, s.checkpoint_interval_s,
                    snapshots=self.snapshots, snapshot_policy=policy))
            elif role == "s3":
                from connectors.change_sink import ChangeSink
                from connectors.object_store import open_store
                from connectors.s3_sink import S3Sink

                writer = S3Sink(open_store(s.object_root), s.s3_format, s.s3_prefix)
                tasks.append(SinkTask(self.log, ChangeSink(writer, partitions, s.chunk_rows),
                                      out, group_of(role), member))
            elif role == "warehouse":
                from connectors.change_sink import ChangeSink
                from connectors.status_sink import StatusTableSink
                from connectors.warehouse_sink import WarehouseSink

                sink = ChangeSink(WarehouseSink(self.warehouse), partitions, s.chunk_rows)
                tasks.append(SinkTask(self.log, sink, out, group_of(role), member))
                tasks.append(SinkTask(self.log, StatusTableSink(self.warehouse), out,
                                      group_of("warehouse-status"), member))
            elif role == "status-table":
                if not s.status_table:
                    continue
                from connectors.dynamo_status import DynamoStatusSink, StatusTable

                # The table is checked (or created) here, before any group is joined: a
                # table with another key schema stops the worker with its name.
                tasks.append(SinkTask(self.log, DynamoStatusSink(StatusTable(s.status_table)),
                                      out, group_of(role), member))
            else:
                raise ValueError(f"unknown role {role!r}; expected some of {', '.join(ROLES)}")
        return Worker(tasks)

    def replay(self, start: str, on_tick: Any = None) -> str:
        """Rewinds the segments processor and both sinks, then reprocesses to the end. The
        warehouse's membership is rebuilt from nothing (from the changes topic, where the
        outputs the replay supersedes are void), the S3 objects from the last batch
        boundary before the start."""
        segments = AudienceSegments()
        sinks = [SinkGroup(group_of("s3"), CHANGES),
                 SinkGroup(group_of("warehouse"), CHANGES, rebuild=True)]
        # Nothing changes unless every worker is stopped (any role: the warehouse is one
        # file, and the status sink holds it too); then the start is resolved, then the
        # warehouse reset, then the log rewound.
        check_stopped(self.log, group_names(ROLES))
        replay_plan = plan(self.log, segments.input_topic, start)
        self.warehouse.reset_segments()
        epoch = rewind(self.log, segments, group_of("segments"), sinks, replay_plan,
                       self.snapshots)
        worker = self.worker(("segments", "s3", "warehouse"))
        seen = -1

        def caught_up() -> bool:
            # Idle tasks have checkpointed (outputs flushed): caught up once a further idle
            # round saw no new message anywhere.
            nonlocal seen
            total = sum(worker.processed.values())
            done, seen = total == seen, total
            return done

        started = time.monotonic()
        worker.run(until=caught_up, on_tick=on_tick)
        processed = ", ".join(f"{n}: {c:,}" for n, c in worker.processed.items())
        return (f"replayed from {start} as epoch {epoch} in "
                f"{time.monotonic() - started:.2f}s (messages {processed})")

    def verify(self, batch_id: str | None = None) -> Report:
        """Folds `audience.rows` from the start with the segments processor and compares the
        members it gives with the restored state, the warehouse and the S3 objects. With a
        batch, only the segments that batch names are compared."""
        from connectors.object_store import open_store
        from connectors.s3_fold import fold_objects

        only = None
        if batch_id is not None:
            status = self.batches().get(batch_id)
            if status is None:
                raise ValueError(f"no batch {batch_id}")
            named = set(status.segments)
            only = lambda fact: fact[0] in named  # noqa: E731

        def members(tables: dict[str, dict[str, Any]]) -> set[tuple[str, ...]]:
            return {(segment, user) for user, memberships in tables["members"].items()
                    for segment, _batch in memberships}

        sinks = {
            "warehouse": lambda: set(self.warehouse.members()),
            "s3": lambda: fold_objects(open_store(self.settings.object_root),
                                       self.settings.s3_prefix),
        }
        return verify(self.log, AudienceSegments(), members, sinks, self.snapshots, only,
                      group_of("segments"))

    def dead_letters(self, batch_id: str | None = None) -> Iterator[dict[str, Any]]:
        for partition in self.log.partitions(DEAD_LETTER):
            for msg in self.log.read(DEAD_LETTER, partition):
                value = decode(msg.value)[1]
                if batch_id is None or value["batch_id"] == batch_id:
                    yield value

    def wait_for_groups(self, groups: list[str], check: Any = None,
                        timeout_s: float = 30.0) -> None:
        """Waits (bounded) until these groups have consumed everything on the log."""
        deadline = time.monotonic() + timeout_s
        while behind := [gp for g in groups for gp in self.log.group_positions(g) if gp.lag]:
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"consumer groups did not catch up within {timeout_s:.0f}s: " + ", ".join(
                        f"{gp.group} {gp.tp} lag {gp.lag}" for gp in behind))
            time.sleep(0.05)  # polling the log's committed positions

    def batches(self) -> dict[str, BatchStatus]:
        return read_table(self.log, PipelineState(), "batches", self.snapshots)

    def close(self) -> None:
        if self._warehouse is not None:
            self._warehouse.close()
        self.log.close()

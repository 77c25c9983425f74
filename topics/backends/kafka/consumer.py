"""A consumer-group member: kafka-python's KafkaConsumer behind the Consumer interface.

Rebalance callbacks. kafka-python 3 runs listener callbacks on its IO thread, where a
blocking call into the same consumer (a commit in on_revoked, `committed()` in
on_assigned) raises, and where a long changelog restore would stall heartbeats. So the
kafka-side listener is asynchronous: it hands the runtime's listener to a helper thread and
awaits it, while the IO loop keeps heartbeating. The thread that called `poll` is blocked
inside kafka-python's poll meanwhile, so to the runtime the callbacks still run inside
`poll`, one at a time, revocations before the partitions are given up (eager protocol:
before JoinGroup), assignments before any message of the new partitions is returned.

Joining. kafka-python 3.0.12 drops a join that completes while no poll is waiting for it
and starts another, so polls of `timeout_s=0` (the worker's) may take many rounds to join.
`poll` therefore keeps polling while the member is (re)joining, bounded by the session
timeout: about session_timeout/2 on Tansu, until every member has rejoined on Kafka.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka.errors import CommitFailedError, RebalanceInProgressError
from kafka.future import Future
from kafka.structs import OffsetAndMetadata

from topics.backends.kafka.reader import to_message
from topics.log import Message, RebalanceListener, TopicPartition

log_ = logging.getLogger(__name__)

JOIN_POLL_MS = 50


def ours(tps: Iterable[KafkaTP]) -> list[TopicPartition]:
    return sorted(TopicPartition(tp.topic, tp.partition) for tp in tps)


def theirs(tp: TopicPartition) -> KafkaTP:
    return KafkaTP(tp.topic, tp.partition)


class _Handoff(AsyncConsumerRebalanceListener):
    def __init__(self, member: GroupConsumer):
        self.member = member

    async def on_partitions_revoked(self, revoked: set[KafkaTP]) -> None:
        await self.member.run_listener(self.member.revoked, revoked)

    async def on_partitions_assigned(self, assigned: set[KafkaTP]) -> None:
        await self.member.run_listener(self.member.assigned, assigned)

    async def on_partitions_lost(self, lost: set[KafkaTP]) -> None:
        # KIP-429: evicted (session expired, fenced generation): no commit can succeed and
        # nothing of these partitions may be made durable any more.
        await self.member.run_listener(self.member.lost, lost)


class GroupConsumer:
    def __init__(self, bootstrap: str, group: str, topics: Sequence[str],
                 listener: RebalanceListener, member: str, options: dict[str, Any]):
        self.group = group
        self.listener = listener
        self._closing = False
        self._listener_error: BaseException | None = None
        config = {**options, "client_id": member} if member else dict(options)
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                       enable_auto_commit=False,
                                       auto_offset_reset="earliest", **config)
        self.join_wait_s = self._consumer.config["session_timeout_ms"] / 1000
        self._consumer.subscribe(list(topics), listener=_Handoff(self))

    # -- rebalance callbacks (helper thread, while poll waits) ----------------------------
    async def run_listener(self, callback: Callable[[list[TopicPartition]], None],
                           tps: set[KafkaTP]) -> None:
        if not tps or self._closing:
            return
        net = self._consumer._net  # kafka-python's IO loop: the awaited future resolves on it
        done = Future()

        def work() -> None:
            try:
                callback(ours(tps))
            except BaseException as exc:
                self._listener_error = exc
                net.call_soon_threadsafe(lambda error=exc: done.failure(error))
            else:
                net.call_soon_threadsafe(lambda: done.success(None))

        threading.Thread(target=work, name=f"rebalance-{self.group}", daemon=True).start()
        await done

    def revoked(self, tps: list[TopicPartition]) -> None:
        self.listener.on_revoked(tps)

    def lost(self, tps: list[TopicPartition]) -> None:
        log_.warning("group %s: lost %s (evicted from the group)", self.group,
                     ", ".join(map(str, tps)))
        on_lost = getattr(self.listener, "on_lost", None)
        (on_lost or self.listener.on_revoked)(tps)

    def assigned(self, tps: list[TopicPartition]) -> None:
        # Every assigned partition starts after its committed position, as on the embedded
        # backend: the runtime dropped its state on revocation and resumes from the commit
        # (a sink re-reads its open batch from there). kafka-python 3 keeps the fetch
        # position of a partition that a rebalance revokes and assigns back to the same
        # member (eager protocol: a rebalance revokes every partition), so without this
        # seek such a sink went on mid-batch, missed the batch's start and failed it with a
        # count mismatch.
        for tp in tps:
            committed = self._consumer.committed(theirs(tp))
            if committed is None:
                self._consumer.seek_to_beginning(theirs(tp))
            else:
                self._consumer.seek(theirs(tp), committed)
        self.listener.on_assigned(tps)

    # -- Consumer -------------------------------------------------------------------------
    def assignment(self) -> set[TopicPartition]:
        return set(ours(self._consumer.assignment()))

    def _joining(self) -> bool:
        coordinator = getattr(self._consumer, "_coordinator", None)
        need_rejoin = getattr(coordinator, "need_rejoin", None)
        return bool(need_rejoin()) if callable(need_rejoin) else False

    def _poll(self, max_messages: int, timeout_ms: int) -> dict[KafkaTP, list[Any]]:
        try:
            return self._consumer.poll(timeout_ms=timeout_ms, max_records=max_messages)
        except Exception:
            error, self._listener_error = self._listener_error, None
            if error is not None:
                raise error from None  # the runtime's own exception, not kafka's wrapper
            raise

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        records = self._poll(max_messages, max(0, int(timeout_s * 1000)))
        if not records and self._joining():
            deadline = time.monotonic() + self.join_wait_s
            while not records and self._joining() and time.monotonic() < deadline:
                records = self._poll(max_messages, JOIN_POLL_MS)
        return [to_message(r) for batch in records.values() for r in batch]

    def seek_after(self, tp: TopicPartition, position: int | None) -> None:
        ktp = theirs(tp)
        if position is None:
            self._consumer.seek_to_beginning(ktp)
        else:
            self._consumer.seek(ktp, position + 1)

    def commit(self, positions: dict[TopicPartition, int],
               metadata: dict[TopicPartition, str] | None = None) -> None:
        owned = self._consumer.assignment()
        notes = metadata or {}
        offsets = {theirs(tp): OffsetAndMetadata(position + 1, notes.get(tp, ""), -1)
                   for tp, position in positions.items() if theirs(tp) in owned}
        if not offsets:
            return  # a revoked partition's position belongs to its new owner
        try:
            self._consumer.commit(offsets)
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # The partitions moved on; their new owner resumes from the last commit and
            # skips what the changelog stamp (processors) or the sink stamps already hold.
            log_.warning("group %s: commit of %s failed, the group is rebalancing: %s",
                         self.group, ", ".join(str(tp) for tp in sorted(positions)), exc)

    def _committed(self, tp: TopicPartition) -> OffsetAndMetadata | None:
        return self._consumer.committed(theirs(tp), metadata=True)

    def committed(self, tp: TopicPartition) -> int | None:
        found = self._committed(tp)
        return None if found is None or found.offset <= 0 else found.offset - 1

    def committed_metadata(self, tp: TopicPartition) -> str:
        found = self._committed(tp)
        return (found.metadata or "") if found is not None else ""

    def close(self) -> None:
        """Revokes what it owns (the runtime checkpoints), then leaves the group."""
        if self._closing:
            return
        try:
            owned = self.assignment()
            if owned:
                self.listener.on_revoked(sorted(owned))
        finally:
            self._closing = True
            self._consumer.close(autocommit=False)

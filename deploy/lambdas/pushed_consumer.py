"""A consumer whose messages are pushed to it (a Lambda event source mapping's batch), so
that the project's ProcessorTask runs unchanged on Lambda: restore, claim (a new owner
generation: fencing), fold, checkpoint (outputs, changelog with its stamp).

Lambda owns the stream's iterator and its checkpoint (the mapping moves past a batch that
returns without failures); the changelog's stamp is what makes a re-delivered record a
no-op. So `commit` keeps nothing and `committed` knows nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from topics.log import Message, RebalanceListener, TopicPartition


class PushedConsumer:
    def __init__(self, listener: RebalanceListener):
        self.listener = listener
        self._queue: deque[Message] = deque()
        self._owned: set[TopicPartition] = set()

    def push(self, message: Message) -> None:
        self._queue.append(message)

    def assignment(self) -> set[TopicPartition]:
        return set(self._owned)

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        taken: list[Message] = []
        while self._queue and len(taken) < max_messages:
            message = self._queue[0]
            if message.tp not in self._owned:
                # Assigned on first sight, before any of its messages is returned.
                self._owned.add(message.tp)
                self.listener.on_assigned([message.tp])
            taken.append(self._queue.popleft())
        return taken

    def seek_after(self, tp: TopicPartition, position: int | None) -> None:
        pass  # positions at or below the changelog's stamp are skipped by the task

    def commit(self, positions: dict[TopicPartition, int],
               metadata: dict[TopicPartition, str] | None = None) -> None:
        pass

    def committed(self, tp: TopicPartition) -> int | None:
        return None

    def committed_metadata(self, tp: TopicPartition) -> str:
        return ""

    def close(self) -> None:
        # No revoke: the handler checkpointed; a revoke would also snapshot every partition
        # this invocation touched, every invocation (snapshots follow the task's policy).
        self._queue.clear()
        self._owned.clear()


class PushedLog:
    """The pipeline's log, except that its consumer is a PushedConsumer."""

    def __init__(self, log: Any):
        self._log = log
        self.pushed: PushedConsumer | None = None

    def consumer(self, group: str, topics: Sequence[str], listener: RebalanceListener,
                 member: str = "") -> PushedConsumer:
        self.pushed = PushedConsumer(listener)
        return self.pushed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

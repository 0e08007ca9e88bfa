"""Which Kafka offsets an engine may commit: requests finish out of order, commits must not.

An offset is committable only when every message up to it on its partition is done (its request
has its terminal entry). The tracker owns that bookkeeping; the service asks it after each step.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from lorafleet.common import settings


class OffsetTracker:
    def __init__(self) -> None:
        self._open: dict[TopicPartition, list[int]] = {}  # min-heap of offsets not yet done
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # one past the highest offset seen
        self._committed: dict[TopicPartition, int] = {}

    def seen(self, tp: TopicPartition, offset: int) -> None:
        heapq.heappush(self._open.setdefault(tp, []), offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        self._done.setdefault(tp, set()).add(offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Partitions whose commit point moved: {tp: offset of the first message not done}."""
        out = {}
        for tp, heap in self._open.items():
            done = self._done.get(tp, set())
            while heap and heap[0] in done:
                done.discard(heapq.heappop(heap))
            point = heap[0] if heap else self._next[tp]
            if point > self._committed.get(tp, -1):
                out[tp] = point
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions) -> None:
        """Partitions revoked in a rebalance: their open messages will be redelivered elsewhere."""
        for tp in partitions:
            self._open.pop(tp, None), self._done.pop(tp, None)
            self._next.pop(tp, None), self._committed.pop(tp, None)


class OffsetCommitter:
    """Commits what the tracker says, one commit at a time, each bounded in time
    (LORAFLEET_KAFKA_TIMEOUT_S); a failed commit leaves the offsets pending for the next one.
    soon() commits in a task of its own, so a broker that is away never holds up the engine's
    steps (nor the tokens they stream to Redis)."""

    def __init__(self, tracker: OffsetTracker, log: Any) -> None:
        self.tracker, self.log = tracker, log
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._again = False

    def soon(self, consumer) -> None:
        if self._task is not None and not self._task.done():
            self._again = True  # the running task commits once more when it is done
            return
        self._task = asyncio.create_task(self._commit_until_current(consumer))

    async def _commit_until_current(self, consumer) -> None:
        while True:
            self._again = False
            await self.commit(consumer)
            if not self._again:
                return

    async def commit(self, consumer) -> None:
        async with self._lock:
            offsets = self.tracker.committable()
            if not offsets or consumer is None:
                return
            try:
                await asyncio.wait_for(consumer.commit(offsets), settings.read("KAFKA_TIMEOUT_S"))
            except (KafkaError, asyncio.TimeoutError) as exc:
                self.log.warning("commit failed; offsets stay pending", error=repr(exc))
                return
            self.tracker.committed(offsets)

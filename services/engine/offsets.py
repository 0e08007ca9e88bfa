"""Which Kafka offsets an engine may commit: requests finish out of order, commits must not.

An offset is committable only when every message up to it on its partition is done (its request
has its terminal entry). The tracker owns that bookkeeping; the service asks it after each step.
"""

from __future__ import annotations

import heapq

from aiokafka import TopicPartition


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

    def pending(self) -> int:
        return sum(len(h) for h in self._open.values())

"""Kafka consumer lag of one engine, per work-topic partition it holds: the partition's end
offset minus the engine's committed offset (messages it has not finished), every LAG_EVERY_S.

The end offsets come from one list-offsets request per round (`end_offsets`), the committed ones
from the group coordinator (`committed`); each round is bounded in time, and a broker outage only
leaves the gauge at its last value (logged once per outage), never stops the engine.
"""

from __future__ import annotations

import asyncio

LAG_EVERY_S = 10.0
LAG_TIMEOUT_S = 5.0


async def report_lag(consumer, gauge, stop: asyncio.Event, log, every_s: float = LAG_EVERY_S) -> None:
    """gauge: labelled by partition (EngineMetrics.kafka_lag). Runs until `stop` is set."""
    failing = False
    while not stop.is_set():
        try:
            await asyncio.wait_for(_measure(consumer, gauge), LAG_TIMEOUT_S)
            failing = False
        except Exception as exc:  # the broker away or a rebalance under way: try again next round
            if not failing:
                log.warning("consumer lag not measured", error=repr(exc))
            failing = True
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def _measure(consumer, gauge) -> None:
    partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
    gauge.clear()  # partitions this engine no longer holds leave the gauge
    if not partitions:
        return
    ends = await consumer.end_offsets(partitions)
    for tp in partitions:
        committed = await consumer.committed(tp)
        gauge.labels(str(tp.partition)).set(max(ends[tp] - (committed or 0), 0))

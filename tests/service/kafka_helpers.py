"""Reading topics back in tests: every record of a topic, all partitions, from the beginning."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


async def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0,
                     settle_s: float = 0.5) -> list[ConsumerRecord]:
    """At least `count` records of `topic` (fails on timeout), plus any that arrive within
    `settle_s` after that - so a test also sees records that should NOT be there."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        partitions: set[int] = set()
        while not partitions and time.monotonic() < deadline:
            await consumer.topics()  # refreshes metadata
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await asyncio.sleep(0.1)
        if not partitions:
            raise AssertionError(f"topic {topic} does not exist after {timeout_s}s")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        settle_until = None
        while True:
            now = time.monotonic()
            if settle_until is None and len(records) >= count:
                settle_until = now + settle_s
            if settle_until is not None and now >= settle_until:
                return records
            if now >= deadline:
                raise AssertionError(f"{topic}: {len(records)} records after {timeout_s}s, expected {count}")
            batch = await consumer.getmany(timeout_ms=100)
            for tp_records in batch.values():
                records.extend(tp_records)
    finally:
        await consumer.stop()

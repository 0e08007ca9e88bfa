"""Kafka as the tests read it back: a topic's records up to its end offsets, a group's committed
offsets read as an outsider (no join), and one batch of raw messages produced at once.

No settle windows: a test proves a record absent by reading the whole topic after the event that
ends its story (typically: the consumer group committed every message, see `wait_all_committed`),
never by waiting a while for it not to show up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from lorafleet.common.kafka import make_producer

POLL_S = 0.1  # between two looks at a condition (never a bound: each wait has its own timeout)


async def _partitions(consumer: AIOKafkaConsumer, topic: str, deadline: float) -> list[TopicPartition]:
    while True:
        await consumer.topics()  # refreshes metadata
        partitions = consumer.partitions_for_topic(topic) or set()
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if time.monotonic() >= deadline:
            raise AssertionError(f"topic {topic} does not exist")
        await asyncio.sleep(POLL_S)


async def _read_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition], deadline: float) -> list[ConsumerRecord]:
    """The assigned partitions' records from the current positions up to their end offsets. Tansu
    0.6.0 answers ListOffsets (latest) with the base offset of a partition's last batch + 1, short
    of the true end when that batch holds several records; a fetch returns whole batches, so
    reading up to that offset still reads every record."""
    records: list[ConsumerRecord] = []
    ends = await consumer.end_offsets(tps)
    while any([await consumer.position(tp) < ends[tp] for tp in tps]):
        for partition_records in (await consumer.getmany(timeout_ms=100)).values():
            records.extend(partition_records)
        if time.monotonic() >= deadline:
            raise AssertionError(f"{tps[0].topic}: read {len(records)} records, not yet up to the end offsets {ends}")
    return records


async def read_topic(bootstrap: str, topic: str, count: int = 1, *,
                     where: Callable[[ConsumerRecord], bool] | None = None, timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Every record of `topic` (all partitions, from the beginning) up to its end offsets, once at
    least `count` of them (of those `where` admits, if given) are there; fails after `timeout_s`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        tps = await _partitions(consumer, topic, deadline)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        while True:
            records += await _read_to_end(consumer, tps, deadline)
            if sum(1 for r in records if where is None or where(r)) >= count:
                return records
            if time.monotonic() >= deadline:
                raise AssertionError(f"{topic}: {len(records)} records after {timeout_s}s, expected {count}"
                                     + (" matching" if where else ""))
            await asyncio.sleep(POLL_S)
    finally:
        await consumer.stop()


async def group_offsets(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """({partition: offset `group` committed, 0 when none}, {partition: one past its last record})
    of `topic`, read by a consumer that does not join the group."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                              auto_offset_reset="earliest", fetch_max_wait_ms=100)
    await reader.start()
    try:
        deadline = time.monotonic() + 60
        tps = await _partitions(reader, topic, deadline)
        committed = {tp.partition: await reader.committed(tp) or 0 for tp in tps}
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = dict.fromkeys(committed, 0)
        for record in await _read_to_end(reader, tps, deadline):
            ends[record.partition] = max(ends[record.partition], record.offset + 1)
        return committed, ends
    finally:
        await reader.stop()


async def wait_all_committed(bootstrap: str, group: str, topic: str, timeout_s: float = 60.0) -> None:
    """Until `group` has committed every message of `topic`: its consumer has finished with each."""
    deadline = time.monotonic() + timeout_s
    while True:
        committed, ends = await group_offsets(bootstrap, group, topic)
        if committed == ends:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"group {group} committed {committed} of {topic}, end offsets {ends}, "
                                 f"after {timeout_s}s")
        await asyncio.sleep(POLL_S)


async def produce_batch(bootstrap: str, topic: str, values: list[bytes], key: bytes = b"k",
                        max_request_size: int = 1 << 20) -> None:
    """Produce `values` as one batch (one produce request: a consumer fetches them together)."""
    producer = make_producer(bootstrap, max_request_size=max_request_size)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for value in values]
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()

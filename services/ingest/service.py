"""The ingest service: requests topic -> validation -> work topic / error replies / dead letters.

Life of the service:
1. load the tokenizer, create the topics that are missing (requests, dead-letter, work),
   connect to Redis and Kafka, join the consumer group; then report ready.
2. loop: fetch a batch, hand it to BatchHandler, commit its offsets once every outcome is
   durable. Offsets are committed per batch, in order, so a crash re-delivers at most the batch
   in flight (its outcomes are idempotent downstream). When Redis or the broker stays away past
   the retry budget, or the dead-letter topic refuses every dead letter, the batch is fetched
   again and handled once they are back (backing off).
3. on SIGTERM/SIGINT (or the caller's `stop` event): stop fetching, finish and commit the batch
   in flight, leave the group, flush the producer - within drain_timeout_s, else give up on the
   batch (it is re-delivered to another member) and exit.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from lorafleet.common.kafka import (
    TopicSpec,
    ensure_topics,
    is_transient_kafka_error,
    make_consumer,
    make_producer,
    partition_count,
    with_kafka_retries,
)
from lorafleet.common.logging import get_logger
from lorafleet.common.replies import ReplyWriteError, ReplyWriter, connect_redis
from lorafleet.common.retry import outage_backoff
from lorafleet.common.signals import install_signal_stop
from lorafleet.ingest.config import IngestConfig
from lorafleet.ingest.handler import BatchHandler, DeadLetterRefused
from lorafleet.ingest.metrics import IngestMetrics
from lorafleet.ingest.prompts import PromptEncoder
from lorafleet.ingest.routing import Router


class _WaitForBatchOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another member, let the batch in flight finish and commit, so
    the new owner does not serve it a second time."""

    def __init__(self, batch_lock: asyncio.Lock) -> None:
        self.batch_lock = batch_lock

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.batch_lock:
            pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


async def run_ingest(config: IngestConfig, *, stop: asyncio.Event | None = None,
                     ready: asyncio.Event | None = None, metrics: IngestMetrics | None = None) -> None:
    """Run until `stop` is set (default: until SIGTERM/SIGINT), then drain and return.
    `ready` is set once topics exist and the consumer has joined its group; metrics: /metrics' source."""
    log = get_logger("ingest", group=config.group_id)
    stop, installed = install_signal_stop(stop)
    encoder = await asyncio.to_thread(PromptEncoder.load, config.model_dir, config.chat_template)
    await ensure_topics(config.kafka_bootstrap, [
        TopicSpec(config.requests_topic, config.requests_partitions),
        TopicSpec(config.dlq_topic, 1),
        TopicSpec(config.work_topic, config.work_partitions),
    ])
    redis = connect_redis(config.redis_url)
    producer = make_producer(config.kafka_bootstrap, client_id="lorafleet-ingest")
    batch_lock = asyncio.Lock()
    consumer = make_consumer(config.kafka_bootstrap, [], config.group_id,
                             session_timeout_ms=config.session_timeout_ms,
                             max_poll_records=config.max_batch, client_id="lorafleet-ingest")
    consumer.subscribe([config.requests_topic], listener=_WaitForBatchOnRevoke(batch_lock))
    try:
        writer = ReplyWriter(redis)
        await writer.prepare()
        await with_kafka_retries(producer.start, "start producer")
        router = Router(await partition_count(producer, config.work_topic), config.hot_adapter_rps,
                        config.hot_window_s, time.monotonic, affinity=config.routing == "affinity")
        handler = BatchHandler(encoder=encoder, writer=writer, producer=producer, router=router,
                               work_topic=config.work_topic, dlq_topic=config.dlq_topic, log=log, metrics=metrics)
        await consumer.start()
        log.info("ingest ready", requests_topic=config.requests_topic, work_topic=config.work_topic,
                 work_partitions=router.n_partitions, vocab_size=encoder.limits.vocab_size,
                 context_len=encoder.limits.context_len)
        if ready is not None:
            ready.set()
        loop_task = asyncio.create_task(_consume_loop(consumer, handler, batch_lock, stop, log))
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if loop_task.done():
            stop_task.cancel()
            loop_task.result()  # a fatal error in the loop: raise it
        else:
            log.info("draining", timeout_s=config.drain_timeout_s)
            try:
                await asyncio.wait_for(loop_task, config.drain_timeout_s)
            except asyncio.TimeoutError:
                log.error("drain timed out; the uncommitted batch will be delivered again")
        log.info("ingest stopped", **handler.counts)
    finally:
        for sig in installed:
            asyncio.get_running_loop().remove_signal_handler(sig)
        with suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 10)
        with suppress(Exception):
            await asyncio.wait_for(producer.stop(), 10)
        await redis.aclose()


async def _consume_loop(consumer, handler: BatchHandler, batch_lock: asyncio.Lock,
                        stop: asyncio.Event, log) -> None:
    outage = outage_backoff()  # while the broker or Redis is away
    while not stop.is_set():
        batch = await consumer.getmany(timeout_ms=200)
        if not batch:
            continue
        async with batch_lock:
            records = [record for partition_records in batch.values() for record in partition_records]
            try:
                await handler.handle(records)
            except Exception as exc:
                if not (isinstance(exc, (ReplyWriteError, DeadLetterRefused)) or is_transient_kafka_error(exc)):
                    raise
                # Redis or the broker outlasted the retry budget, or the dead-letter topic takes
                # nothing: nothing of this batch is known to be durable, so fetch it again (its
                # outcomes are idempotent) and handle it once they are back.
                for tp, recs in batch.items():
                    consumer.seek(tp, recs[0].offset)
                log.error("outcomes not durable; the batch will be handled again", error=repr(exc))
                await outage.sleep()
                continue
            outage.reset()
            offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs}
            try:
                await with_kafka_retries(lambda: consumer.commit(offsets), "commit offsets")
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced under us: the new owner re-delivers; outcomes are idempotent.
                log.warning("commit refused after rebalance", error=repr(exc))
            except Exception as exc:
                if not is_transient_kafka_error(exc):
                    raise
                log.warning("commit failed; the batch may be delivered again", error=repr(exc))

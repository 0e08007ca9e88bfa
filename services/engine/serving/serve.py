"""The engine process: connects Kafka, Redis and the node's adapter store to one EngineService,
runs its consume and step loops, and drains on SIGTERM/SIGINT (service.py beside it is the loop
itself)."""

from __future__ import annotations

import asyncio
from contextlib import suppress

from aiokafka import ConsumerRebalanceListener

from lorafleet.adapter_store.client import AdapterStoreClient
from lorafleet.common.kafka import (
    TopicSpec,
    ensure_topics,
    make_consumer,
    with_kafka_retries,
)
from lorafleet.common.replies import ReplyWriter, connect_redis
from lorafleet.common.signals import install_signal_stop
from lorafleet.engine.engine import LLMEngine

from .config import EngineServiceConfig
from .engine_thread import EngineThread
from .kafka_lag import report_lag
from .metrics import EngineMetrics
from .service import EngineService
from .stall_watch import StallWatch

ENGINE_CLOSE_S = 30.0  # how long the drained service waits for the engine thread to close the engine


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: EngineService):
        self.service = service

    async def on_partitions_revoked(self, revoked):
        await self.service.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned):
        self.service.log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))


async def run_engine_service(cfg: EngineServiceConfig, *, stop: asyncio.Event | None = None,
                             ready: asyncio.Event | None = None, watch: StallWatch | None = None,
                             metrics: EngineMetrics | None = None) -> None:
    """Serve until `stop` (default: SIGTERM/SIGINT), then drain within cfg.drain_timeout_s.
    watch: the engine steps' StallWatch (the caller's heartbeat reads it); metrics: /metrics' source."""
    stop, installed = install_signal_stop(stop)
    thread = EngineThread()  # the engine's one thread, from construction to close
    engine = await thread.call(LLMEngine, cfg.engine)
    await ensure_topics(cfg.kafka_bootstrap, [TopicSpec(cfg.work_topic, cfg.work_partitions)])
    redis = connect_redis(cfg.redis_url)
    store = AdapterStoreClient(cfg.store_address, engine.spec, max_rank=cfg.engine.max_adapter_rank)
    writer = ReplyWriter(redis)
    service = EngineService(cfg, engine, writer, store, watch, thread, metrics)
    consumer = make_consumer(cfg.kafka_bootstrap, [], cfg.group_id, session_timeout_ms=cfg.session_timeout_ms,
                             client_id=f"lorafleet-engine-{cfg.name}", max_poll_records=cfg.max_inflight)
    consumer.subscribe([cfg.work_topic], listener=_Rebalance(service))
    service.consumer = consumer
    log = service.log
    try:
        await writer.prepare()
        await with_kafka_retries(consumer.start, "start consumer")
        log.info("engine ready", device=str(engine.device), pool_pages=engine.kv.allocator.num_pages, work_topic=cfg.work_topic)
        if ready is not None:
            ready.set()
        drained = asyncio.Event()
        consume = asyncio.create_task(service.consume_loop(stop))
        lag = asyncio.create_task(report_lag(consumer, metrics.kafka_lag, stop, log)) if metrics is not None else None
        steps = asyncio.create_task(service.step_loop(stop, drained))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({consume, steps, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consume, steps):
            if task in done and task.exception() is not None:
                raise task.exception()
        log.info("draining", in_flight=len(service.jobs), timeout_s=cfg.drain_timeout_s)
        consume.cancel()
        try:
            await asyncio.wait_for(drained.wait(), cfg.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain timed out; unfinished requests will be redelivered", in_flight=len(service.jobs))
        steps.cancel()
        with suppress(asyncio.CancelledError):
            await steps
        if lag is not None:
            lag.cancel()
        await service.commit()
        log.info("engine stopped")
    finally:
        for sig in installed:
            asyncio.get_running_loop().remove_signal_handler(sig)
        with suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 10)
        await redis.aclose()
        try:  # stops tensor-parallel worker ranks (a no-op when tp_size is 1); queued behind a stuck step
            await asyncio.wait_for(thread.call(engine.close), ENGINE_CLOSE_S)
        except asyncio.TimeoutError:
            log.error("the engine thread is still busy (a stuck step?); exiting without closing the engine")
        thread.shutdown(timeout_s=0)

"""The engine service: work topic in, engine steps, reply streams out.

    consume ──► job (fetch adapter from the node's store at once) ──► ready ──► engine.add_request
                                                                                   │
    commit offsets ◄── offsets done ◄── terminal entries ◄── ReplyWriter.publish ◄─┘ engine.step

NOTE invariants:
- Only the step loop touches the LLMEngine (it runs each step in a worker thread and holds
  `engine_lock` meanwhile; rebalance aborts take the same lock).
- One ReplyWriter.publish (one pipelined Redis round trip) per step for every request's entries,
  made while the next step runs on the GPU (step_once).
- An offset is committed only when every message up to it has its terminal entry (OffsetTracker).
  A request whose message is delivered again is de-duplicated by the writer (token `index`,
  terminal once), and generation is deterministic per request id (seeded), so a redelivered
  request re-emits the same tokens, which the writer drops.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import suppress

import redis.asyncio as aioredis
from aiokafka import ConsumerRebalanceListener, TopicPartition

from lorafleet.adapter_store.client import AdapterStoreClient
from lorafleet.adapter_store.errors import AdapterNotFoundError, InvalidAdapterError
from lorafleet.common import settings
from lorafleet.common.kafka import TopicSpec, ensure_topics, make_consumer, with_kafka_retries
from lorafleet.common.logging import get_logger
from lorafleet.common.messages import decode_work_item, done_entry, error_entry, token_entry
from lorafleet.common.replies import ReplyWriter

from .adapter_fetcher import AdapterFetcher
from .engine import LLMEngine
from .jobs import Job, engine_error_code, sampling_params
from .offsets import OffsetTracker
from .service_config import EngineServiceConfig
from lorafleet.common.signals import install_signal_stop
from lorafleet.health import StallWatch


class EngineService:
    def __init__(self, cfg: EngineServiceConfig, engine: LLMEngine, writer: ReplyWriter, store: AdapterStoreClient,
                 watch: StallWatch | None = None):
        """watch: told when each engine step starts and ends (the liveness heartbeat reads it)."""
        self.cfg, self.engine, self.writer = cfg, engine, writer
        self.watch = watch if watch is not None else StallWatch(cfg.step_stall_s)
        self.log = get_logger("engine", engine_id=cfg.name)
        self.offsets = OffsetTracker()
        self.jobs: dict[str, Job] = {}  # request id -> job, from first delivery to terminal entry
        self.ready: deque[Job] = deque()  # adapter in hand, not yet in the engine
        self.outbox: list[tuple[str, str, object]] = []  # entries for the next publish
        self.engine_lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.adapters = AdapterFetcher(store, settings.read("ENGINE_HOST_ADAPTER_BYTES"), cfg.adapter_unavailable_s,
                                       self.log)
        self.consumer = None

    # --- intake ----------------------------------------------------------------------------
    async def on_records(self, records) -> None:
        """Take a batch of work messages: one Redis round trip learns what earlier deliveries of
        these requests already published, then each new request starts its adapter fetch."""
        decoded = []
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self.offsets.seen(tp, record.offset)
            try:
                decoded.append((tp, record.offset, decode_work_item(record.value)))
            except Exception as exc:  # not ours to answer: no readable id; ingest never writes this
                self.log.error("undecodable work item skipped", partition=record.partition, offset=record.offset,
                               error=repr(exc))
                self.offsets.done(tp, record.offset)
        state = await self.writer.published_counts([item.id for _, _, item in decoded if item.id not in self.jobs])
        for tp, offset, item in decoded:
            job = self.jobs.get(item.id)
            if job is not None:  # delivered again while we still serve it: done when it is done
                job.deliveries.append((tp, offset))
                continue
            published, terminal = state[item.id]
            if terminal:
                self.offsets.done(tp, offset)
                continue
            job = Job(item, [(tp, offset)], already_published=published, log=self.log)
            self.jobs[item.id] = job
            if item.adapter is None:
                self._make_ready(job)
            else:
                self.adapters.fetch(item.adapter).add_done_callback(lambda task, job=job: self._adapter_arrived(job, task))

    def _adapter_arrived(self, job: Job, task: asyncio.Task) -> None:
        self.adapters.settled(job.item.adapter, task)
        if self.jobs.get(job.item.id) is not job:
            return  # revoked meanwhile
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or exc is not None:
            code = {AdapterNotFoundError: "adapter_not_found", InvalidAdapterError: "invalid_adapter"}.get(
                type(exc), "adapter_unavailable")
            message = str(exc) if exc is not None else "adapter fetch was cancelled"
            if code == "adapter_not_found":
                message = f"adapter {job.item.adapter!r} was not found under the adapter root"
            self._fail(job, code, message)
            return
        job.adapter = task.result()
        self._make_ready(job)

    def _make_ready(self, job: Job) -> None:
        self.ready.append(job)
        self.wake.set()

    def _fail(self, job: Job, code: str, message: str) -> None:
        job.log.info("request failed", code=code, error=message)
        self.outbox.append((job.item.reply_stream, job.item.id, error_entry(code, message)))
        job.terminal_queued = True
        self.wake.set()

    # --- the step loop ---------------------------------------------------------------------
    def _admit_ready(self) -> None:
        while self.ready:
            job = self.ready.popleft()
            item = job.item
            try:
                self.engine.add_request(item.id, prompt_token_ids=item.prompt_token_ids, params=sampling_params(item),
                                        adapter_id=item.adapter, adapter=job.adapter, arrival=item.received_at)
            except ValueError as exc:
                self._fail(job, engine_error_code(exc), str(exc))

    def _collect(self, outputs) -> None:
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:
                continue
            item = job.item
            if out.index >= job.already_published:
                self.outbox.append((item.reply_stream, item.id, token_entry(out.new_text, out.new_token_ids, out.index)))
            if out.finished:
                self.outbox.append((item.reply_stream, item.id,
                                    done_entry(out.finish_reason, out.num_prompt_tokens, out.num_output_tokens)))
                job.terminal_queued = True
                # One line per served request, with engine_id, request_id and adapter_id bound:
                # which engine served what (scale-out test, affinity measurement, operators).
                job.log.info("request done", finish_reason=out.finish_reason, completion_tokens=out.num_output_tokens)

    async def step_once(self) -> None:
        """One engine step in a worker thread while the previous step's replies are published and
        finished requests committed: the Redis and Kafka round trips overlap the GPU instead of
        following it (replies go out as soon as before: right after the step that made them).
        When nothing runs next, this step's replies are published at once."""
        async with self.engine_lock:
            self._admit_ready()
            step = asyncio.ensure_future(asyncio.to_thread(self._watched_step)) if self.engine.has_unfinished() else None
            try:
                await self.flush()
            except BaseException:
                if step is not None:  # the step's thread runs on; never leave its result unobserved
                    await asyncio.gather(step, return_exceptions=True)
                raise
            if step is not None:
                self._collect(await step)
        if not self.engine.has_unfinished():
            await self.flush()

    def _watched_step(self):
        """engine.step in the worker thread, timed by the StallWatch."""
        self.watch.started()
        try:
            return self.engine.step()
        finally:
            self.watch.finished()

    async def flush(self) -> None:
        """Publish the outbox in one round trip, then mark finished jobs done and commit."""
        if not self.outbox:
            return
        entries, self.outbox = self.outbox, []
        await self.writer.publish(entries)
        finished = [j for j in self.jobs.values() if j.terminal_queued]
        for job in finished:
            del self.jobs[job.item.id]
            for tp, offset in job.deliveries:
                self.offsets.done(tp, offset)
        await self.commit()

    async def commit(self) -> None:
        offsets = self.offsets.committable()
        if offsets and self.consumer is not None:
            await with_kafka_retries(lambda: self.consumer.commit(offsets), "commit")
            self.offsets.committed(offsets)

    async def step_loop(self, stop: asyncio.Event, drained: asyncio.Event) -> None:
        while True:
            if stop.is_set() and not self.jobs and not self.outbox:
                drained.set()
                return
            await self.step_once()
            if not self.engine.has_unfinished() and not self.ready:
                self.wake.clear()
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 0.05)

    async def consume_loop(self, stop: asyncio.Event) -> None:
        consumer = self.consumer
        while not stop.is_set():
            if len(self.jobs) >= self.cfg.max_inflight:
                await asyncio.sleep(0.02)  # backpressure: the engine is full; Kafka keeps the rest
                continue
            batches = await consumer.getmany(timeout_ms=100, max_records=self.cfg.max_inflight - len(self.jobs))
            for records in batches.values():
                await self.on_records(records)

    # --- rebalance ---------------------------------------------------------------------------
    async def on_revoked(self, revoked) -> None:
        """Commit what is done; abort requests of revoked partitions (another engine gets them)."""
        async with self.engine_lock:
            await self.flush()
            await self.commit()
            revoked = set(revoked)
            for rid, job in list(self.jobs.items()):
                if all(tp in revoked for tp, _ in job.deliveries):
                    self.engine.abort_request(rid)
                    del self.jobs[rid]
                    with suppress(ValueError):
                        self.ready.remove(job)
            self.offsets.forget(revoked)
        if revoked:
            self.log.info("partitions revoked", partitions=sorted(tp.partition for tp in revoked))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: EngineService):
        self.service = service

    async def on_partitions_revoked(self, revoked):
        await self.service.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned):
        self.service.log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))


async def run_engine_service(cfg: EngineServiceConfig, *, stop: asyncio.Event | None = None,
                             ready: asyncio.Event | None = None, watch: StallWatch | None = None) -> None:
    """Serve until `stop` (default: SIGTERM/SIGINT), then drain within cfg.drain_timeout_s.
    watch: the engine steps' StallWatch (the caller's heartbeat reads it)."""
    stop, installed = install_signal_stop(stop)
    engine = await asyncio.to_thread(LLMEngine, cfg.engine)
    await ensure_topics(cfg.kafka_bootstrap, [TopicSpec(cfg.work_topic, cfg.work_partitions)])
    redis = aioredis.from_url(cfg.redis_url)
    store = AdapterStoreClient(cfg.store_address, engine.spec, max_rank=cfg.engine.max_adapter_rank)
    writer = ReplyWriter(redis)
    service = EngineService(cfg, engine, writer, store, watch)
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
        await service.commit()
        log.info("engine stopped")
    finally:
        for sig in installed:
            asyncio.get_running_loop().remove_signal_handler(sig)
        with suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 10)
        await redis.aclose()
        engine.close()  # stops tensor-parallel worker ranks (a no-op when tp_size is 1)

"""The engine service: work topic in, engine steps, reply streams out.

    consume ──► job (fetch adapter from the node's store at once) ──► ready ──┐
                                                                              ▼  engine thread:
    commit offsets ◄── offsets done ◄── terminal entries ◄── ReplyWriter ◄── turn (aborts, admissions,
                                                              .publish        one engine.step)

NOTE invariants:
- Only the engine thread runs LLMEngine code (engine_thread.py); the event loop owns every job,
  the outbox and the offsets, and hands each turn its aborts and admissions. One turn at a time:
  step_once holds `engine_lock` across it, and rebalancing takes the same lock.
- One ReplyWriter.publish (one pipelined Redis round trip) per step for every request's entries,
  made while the next turn runs (step_once).
- An offset is committed only when every message up to it has its terminal entry written
  (OffsetTracker, Job.settled). A redelivered request is de-duplicated by the writer (token
  `index`, terminal once); generation is seeded by request id, so it re-emits the same tokens.
- No request can stop the service: one refused or failing at admission gets its `error` entry; one
  whose reply_stream Redis refuses (WRONGTYPE) is aborted and ends on its default stream.
- Redis faults lose nothing: through an outage intake waits and publishes are retried; after a
  restart that lost entries, each job re-publishes its own from its history (Job.entries_from).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import suppress

from aiokafka import TopicPartition

from lorafleet.adapter_store.client import AdapterStoreClient
from lorafleet.adapter_store.errors import AdapterNotFoundError, InvalidAdapterError
from lorafleet.common import settings
from lorafleet.common.contract import ErrorCode, default_reply_stream
from lorafleet.common.logging import get_logger
from lorafleet.common.messages import (
    decode_work_item,
    done_entry,
    error_entry,
    token_entry,
)
from lorafleet.common.replies import ReplyWriteError, ReplyWriter
from lorafleet.common.retry import outage_backoff
from lorafleet.engine.engine import LLMEngine

from .adapter_fetcher import AdapterFetcher
from .config import EngineServiceConfig
from .engine_thread import EngineThread, EngineTurn, run_turn
from .jobs import Job, done_latencies, engine_error_code
from .metrics import EngineMetrics
from .offsets import OffsetCommitter, OffsetTracker
from .stall_watch import StallWatch

MAX_FAILED_STEPS = 3  # more failed steps in a row stop the engine (it is broken, not a request)


class EngineService:
    def __init__(self, cfg: EngineServiceConfig, engine: LLMEngine, writer: ReplyWriter, store: AdapterStoreClient,
                 watch: StallWatch | None = None, thread: EngineThread | None = None,
                 metrics: EngineMetrics | None = None):
        """watch: told when each engine step starts and ends (the liveness heartbeat reads it);
        thread: the thread that built the engine (engine_thread.py), or a new one; metrics: what
        /metrics serves (metrics.py), or none."""
        self.cfg, self.engine, self.writer, self.metrics = cfg, engine, writer, metrics
        self.thread = thread if thread is not None else EngineThread()
        self.watch = watch if watch is not None else StallWatch(cfg.step_stall_s)
        self.log = get_logger("engine", engine_id=cfg.name)
        self.offsets = OffsetTracker()
        self.committer = OffsetCommitter(self.offsets, self.log)
        self.jobs: dict[str, Job] = {}  # request id -> job, from first delivery to terminal entry
        self.ready: deque[Job] = deque()  # adapter in hand, not yet in the engine
        self.to_abort: list[str] = []  # request ids the next turn aborts before it steps
        self.unfinished = True  # the engine held unfinished requests after the last turn (unknown at first: ask)
        self.failed_steps = 0  # engine steps that raised, in a row
        self._expiry_checked = 0.0  # when _turn_input last looked at deadlines (time.time())
        self.redis_down = False  # the last publish outlasted the writer's retry budget: intake waits
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
        # Waited out through a Redis outage: these records are taken from Kafka and must not be dropped.
        state = await self.writer.published_counts([item.id for _, _, item in decoded if item.id not in self.jobs],
                                                   budget_s=float("inf"))
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
        if self.jobs.get(job.item.id) is not job or job.terminal_queued:
            return  # revoked, cancelled or expired meanwhile
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or exc is not None:
            code = {AdapterNotFoundError: "adapter_not_found", InvalidAdapterError: "invalid_adapter"}.get(
                type(exc), ErrorCode.ADAPTER_UNAVAILABLE)
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
        job.terminal = error_entry(code, message)
        self.outbox.append((job.stream, job.item.id, job.terminal))
        job.terminal_queued = True
        self.wake.set()

    # --- the step loop ---------------------------------------------------------------------
    def _turn_input(self) -> tuple[list[str], list[Job]]:
        """The next turn's aborts and admissions: expired jobs end here, ready ones go in."""
        now = time.time()
        expire = now - self._expiry_checked >= 0.1  # 10 times a second: a few µs per job each time
        self._expiry_checked = now if expire else self._expiry_checked
        for job in self.jobs.values() if expire else ():  # deadlines and the queue limit
            ended = job.expired(now, self.cfg.max_queue_s)
            if ended:
                self.to_abort.append(job.item.id)
                self._fail(job, *ended)
        aborts, self.to_abort = self.to_abort, []
        admits = [job for job in self.ready if not job.terminal_queued]  # not failed while it waited
        self.ready.clear()
        for job in admits:
            job.admitted = True  # unless the turn refuses it (_apply_turn)
        return aborts, admits

    def _apply_turn(self, turn: EngineTurn) -> None:
        self.unfinished = turn.unfinished
        if self.metrics is not None and turn.stats is not None:
            self.metrics.on_turn(turn.stats, turn.seconds)
        for job, exc in turn.refused:
            job.admitted = False
            if isinstance(exc, ValueError):
                self._fail(job, engine_error_code(exc), str(exc))
            else:  # a bug on one request's path must not stop the others
                job.log.error("admission crashed", error=repr(exc), exc_info=exc)
                self._fail(job, ErrorCode.INTERNAL_ERROR, f"the engine could not admit the request: {type(exc).__name__}.")
        if turn.step_error is not None:
            self._step_failed(turn.step_error)
        elif turn.stepped:
            self._collect(turn.outputs)
            self.failed_steps = 0

    def _step_failed(self, exc: Exception) -> None:
        """A step raised: the requests in the engine end with internal_error (committed, so a request
        that breaks steps cannot crash-loop engines); several in a row: the engine is broken."""
        self.failed_steps += 1
        self.log.error("engine step failed", error=repr(exc), in_a_row=self.failed_steps, exc_info=exc)
        if self.failed_steps > MAX_FAILED_STEPS:
            raise RuntimeError(f"{self.failed_steps} engine steps in a row failed") from exc
        for job in self.jobs.values():
            if job.admitted and not job.terminal_queued:
                self.to_abort.append(job.item.id)
                self._fail(job, ErrorCode.INTERNAL_ERROR, f"the engine step serving the request failed "
                           f"({type(exc).__name__}); it may be sent again.")

    def _collect(self, outputs) -> None:
        now = time.time()
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None or job.terminal_queued:  # e.g. failed while this step ran
                continue
            item = job.item
            if self.metrics is not None:
                self.metrics.on_output(job, out, now)
            if out.new_token_ids:
                job.first_token_at = job.first_token_at or now
                entry = token_entry(out.new_text, out.new_token_ids, out.index)
                job.history.append(entry)
                if out.index >= job.already_published:
                    self.outbox.append((job.stream, item.id, entry))
            if out.finished:
                job.terminal = done_entry(out.finish_reason, out.num_prompt_tokens, out.num_output_tokens)
                self.outbox.append((job.stream, item.id, job.terminal))
                job.terminal_queued = True
                # which engine served what (engine_id, request_id, adapter_id bound): tests, operators
                job.log.info("request done", finish_reason=out.finish_reason, completion_tokens=out.num_output_tokens,
                             **done_latencies(job, out.num_output_tokens, now))

    async def step_once(self) -> None:
        """One engine turn on the engine thread while the previous step's replies are published and
        committed (the round trips overlap the step); with nothing to run next, published at once."""
        async with self.engine_lock:
            aborts, admits = self._turn_input()
            turn = None
            if aborts or admits or self.unfinished:
                turn = asyncio.ensure_future(self.thread.call(run_turn, self.engine, self.watch, aborts, admits,
                                                              self.metrics is not None))
            try:
                await self.flush()
            finally:  # even when the publish failed: the step's outputs must reach the outbox
                if turn is not None:
                    self._apply_turn(await turn)
        if not self.unfinished:
            await self.flush()

    async def flush(self) -> None:
        """Publish the outbox in one round trip, then mark finished jobs done and commit."""
        if not self.outbox:
            return
        entries, self.outbox = self.outbox, []
        try:
            states = await self.writer.publish(entries)
        except BaseException:
            self.outbox[:0] = entries  # nothing is known to be written: all of it goes again
            raise
        for request_id, state in states.items():
            job = self.jobs.get(request_id)
            if job is None:
                continue
            if state.error is not None:
                self._stream_refused(job, state.error)
            elif state.cancelled:  # the client set its cancel key: the script wrote `cancelled`
                job.log.info("request cancelled")
                self.to_abort.append(request_id)
                job.terminal_queued = job.settled = True
            elif state.terminal:
                job.settled = True
            elif state.conflicts:
                self._republish_lost(job, state.tokens)
        finished = [j for j in self.jobs.values() if j.settled]
        for job in finished:
            del self.jobs[job.item.id]
            for tp, offset in job.deliveries:
                self.offsets.done(tp, offset)
        if finished:
            self.committer.soon(self.consumer)

    def _stream_refused(self, job: Job, error: str) -> None:
        """Redis refused this request's entries (WRONGTYPE): abort it and end it on its default
        stream, or, refused there too, give it up so its offset is committed."""
        self.to_abort.append(job.item.id)
        default = default_reply_stream(job.item.id)
        if job.stream == default:
            job.log.error("reply undeliverable: Redis refused the default stream", error=error)
            job.terminal_queued = job.settled = True
            return
        refused_stream, job.stream = job.stream, default  # a job still in `ready` is skipped there once failed
        self._fail(job, ErrorCode.INVALID_REQUEST, f"reply_stream {refused_stream[:80]!r} could not be written: {error[:120]}")

    def _republish_lost(self, job: Job, published: int) -> None:  # Redis restarted without its data
        lost = job.entries_from(published)
        if lost:
            job.log.warning("reply stream lost entries; re-publishing", published=published, lost=len(lost))
            self.outbox.extend((job.stream, job.item.id, entry) for entry in lost)
            self.wake.set()

    async def commit(self) -> None:
        await self.committer.commit(self.consumer)

    async def step_loop(self, stop: asyncio.Event, drained: asyncio.Event) -> None:
        outage = outage_backoff()
        while True:
            if stop.is_set() and not self.jobs and not self.outbox:
                drained.set()
                return
            try:
                await self.step_once()
            except ReplyWriteError as exc:  # Redis away past the writer's budget: hold intake, keep trying
                self.redis_down = True
                self.log.error("redis unreachable; intake paused, retrying", error=str(exc))
                await outage.sleep()
                continue
            self.redis_down = False
            outage.reset()
            if not self.unfinished and not self.ready and not self.to_abort:
                self.wake.clear()
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 0.05)

    async def consume_loop(self, stop: asyncio.Event) -> None:
        consumer = self.consumer
        while not stop.is_set():
            if len(self.jobs) >= self.cfg.max_inflight or self.redis_down:
                await asyncio.sleep(0.02)  # backpressure: full, or no Redis to answer with; Kafka keeps the rest
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
                    self.to_abort.append(rid)  # before the next step (the turn after this lock)
                    del self.jobs[rid]
                    with suppress(ValueError):
                        self.ready.remove(job)
            self.offsets.forget(revoked)
        if revoked:
            self.log.info("partitions revoked", partitions=sorted(tp.partition for tp in revoked))

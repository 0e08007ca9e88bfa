"""Iteration-level scheduling: which requests run this step, with how many tokens.

The scheduler owns the waiting and running queues. Each step it spends a token budget first on
running requests (decodes and unfinished prefill chunks, oldest first), then admits waiting
requests in arrival order. Memory is one pool: a request is admitted only when the pages for its
next chunk AND for its adapter (if not resident) can be had, counting cached adapters as free.

NOTE invariants:
- A running request's adapter is pinned in the AdapterCache; it is released exactly once, when
  the request leaves `running` (finish, abort or preemption).
- Preemption is by recompute: the newest running request loses its KV pages and goes back to the
  front of `waiting` with its generated tokens kept; it is recomputed as one longer prompt.
- The waiting queue is FCFS and admission stops at the first request that does not fit, so a
  large request is never starved by a stream of small ones.
- add_request rejects a request that could not run even alone in an empty pool, so preemption
  always ends with progress: no deadlock.
- Scheduling a step advances its requests' computed tokens and counts the token each sampling
  request will get as pending (Request.num_pending) at once, before the step runs: the engine may
  schedule the next step while this one is on the GPU (asynchronous scheduling), and then feeds
  the pending token to it on the device. update_from_output later replaces pending tokens by their
  values. A request whose pending token is its last (max_tokens) is not scheduled again; one that
  ends on EOS or a stop string meanwhile has its extra token dropped. A preempted request waits
  until its pending token is known (it is recomputed from its tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .memory.adapter_cache import AdapterCache
from .memory.host_budget import AdapterDemand
from .memory.kv_cache import KVCacheManager
from .request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # EngineConfig's: the scheduler declares no defaults of its own
    max_batched_tokens: int
    # 0: every step mixes decodes and prefill chunks. k > 0: steps are either all decodes (which a
    # CUDA graph replays) or all prefill (run eagerly), with a prefill step at least every k+1.
    decode_steps_per_prefill: int = 0
    # Split phases: after k decode steps, a prefill step runs only when it would admit at least
    # this many prompt tokens (0: max_batched_tokens // 4), or after 4k decode steps if it admits
    # any. Under load (memory full, a long queue) this makes few large prefill steps instead of
    # many small ones, each of which costs a step's fixed overhead.
    min_prefill_tokens: int = 0


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # the request's computed tokens before this step: it computes tokens [start, start + num_tokens)
    num_tokens: int
    samples: bool  # True when this step completes the request's tokens: it samples one more


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, adapters: AdapterCache):
        self.config = config
        self.kv = kv
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.adapter_demand = AdapterDemand()  # packs of the distinct adapters of requests in the engine
        self._decode_steps = 0  # decode-only steps since the last prefill step (split phases)

    # --- requests in and out ---------------------------------------------------------------
    def pages_needed_alone(self, request: Request) -> int:
        adapter = 0 if request.adapter_weights is None else self.adapters.pages_to_load(request.adapter_weights)
        return self.kv.blocks_for_tokens(request.max_total_tokens) + adapter

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        need, total = self.pages_needed_alone(request), self.kv.allocator.num_pages
        if need > total:
            raise ValueError(
                f"request {request.request_id!r} needs {need} pages (prompt + max_tokens + adapter) "
                f"but the pool has {total}"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if request.adapter_id is not None:
            self.adapter_demand.add(request.adapter_id, self.adapters.pack_bytes(request.adapter_weights))

    def finish_request(self, request_id: str, reason: str) -> Request | None:
        """Remove a request (finished by a stop string, or aborted); frees what it holds."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.adapter_id is not None:
            self.adapter_demand.remove(req.adapter_id)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        phase = self._phase()
        out = SchedulerOutput()
        budget = self.config.max_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            if req.num_pending and req.num_output_tokens >= req.params.max_tokens:
                i += 1  # its last token is being sampled: nothing more to compute
                continue
            if (phase == "decode" and remaining != 1) or (phase == "prefill" and remaining == 1):
                i += 1
                continue
            n = min(remaining, budget)
            while not self.kv.can_grow(req.request_id, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                self.kv.grow(req.request_id, req.num_computed_tokens + n)
                out.scheduled.append(self._entry(req, n))
                budget -= n
                i += 1
        if out.preempted or phase == "decode":
            return out  # memory is short, or a decode-only step: admit nobody new this step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            # A request preempted while its token was pending is recomputed once that token is known
            # (the engine reads a step back before scheduling the step after next, so it waits one
            # step at most; a schedule() right after a preemption admits nobody anyway).
            if req.num_pending or not self._can_admit(req, n):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if req.adapter_id is not None:
                self.adapters.acquire(req.adapter_id, req.adapter_weights)
            self.kv.grow(req.request_id, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._entry(req, n))
            budget -= n
        return out

    def _phase(self) -> str:
        """'mixed' (default), or with split phases 'decode' / 'prefill' for this step."""
        k = self.config.decode_steps_per_prefill
        if k <= 0:
            return "mixed"
        decodes = any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)
        partial = any(r.num_tokens - r.num_computed_tokens > 1 for r in self.running)
        if not decodes:
            prefill = partial or bool(self.waiting)
        elif self._decode_steps < k:
            prefill = False
        elif partial:
            prefill = True  # a chunked prompt is half done: finish it
        elif self.waiting:
            tokens = self._admissible_tokens()
            floor = self.config.min_prefill_tokens or self.config.max_batched_tokens // 4
            prefill = tokens >= floor or (tokens > 0 and self._decode_steps >= 4 * k)
        else:
            prefill = False
        if prefill:
            self._decode_steps = 0
            return "prefill"
        self._decode_steps += 1
        return "decode"

    def _admissible_tokens(self) -> int:
        """Prompt tokens a prefill step could admit now (a dry run of admission, which decides)."""
        budget, seats = self.config.max_batched_tokens, self.config.max_num_seqs - len(self.running)
        free = self.kv.allocator.num_free + self.adapters.evictable_pages()
        tokens, loading = 0, set()
        for req in self.waiting:
            if seats <= 0 or tokens >= budget:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget - tokens)
            need = self.kv.pages_needed(req.request_id, req.num_computed_tokens + n)
            if req.adapter_id is not None and req.adapter_id not in loading and not self.adapters.is_resident(req.adapter_id):
                need += self.adapters.pages_to_load(req.adapter_weights)
                loading.add(req.adapter_id)
            if need > free:
                break
            free, tokens, seats = free - need, tokens + n, seats - 1
        return tokens

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int], eos_ids: tuple[int, ...]) -> list[Request]:
        """The step `out` has run: its pending tokens become `sampled`; finish on EOS or max_tokens.

        Returns the requests that got a new token this step (finished ones included).
        """
        touched = []
        for entry in out.scheduled:
            req = entry.request
            if not entry.samples or req.status is RequestStatus.FINISHED:
                continue  # finished while this step ran (stop string, EOS, abort): drop its token
            token = sampled[req.request_id]
            req.num_pending -= 1
            req.output_token_ids.append(token)
            touched.append(req)
            if token in eos_ids and not req.params.ignore_eos:
                self._finish(req, "stop")
            elif len(req.output_token_ids) >= req.params.max_tokens:
                self._finish(req, "length")
        return touched

    # --- internals -------------------------------------------------------------------------
    def _entry(self, req: Request, n: int) -> ScheduledRequest:
        """Schedules n tokens of req: advances its computed tokens now, and counts a pending token
        when the step samples one."""
        entry = ScheduledRequest(req, req.num_computed_tokens, n, samples=req.num_computed_tokens + n == req.num_tokens)
        req.num_computed_tokens += n
        req.num_pending += entry.samples
        return entry

    def _can_admit(self, req: Request, n: int) -> bool:
        kv_pages = self.kv.pages_needed(req.request_id, req.num_computed_tokens + n)
        if req.adapter_id is None:
            return kv_pages <= self.kv.allocator.num_free + self.adapters.evictable_pages()
        return self.adapters.can_acquire(req.adapter_id, req.adapter_weights, extra_pages=kv_pages)

    def _release(self, req: Request) -> None:
        self.kv.release(req.request_id)
        if req.adapter_id is not None:
            self.adapters.release(req.adapter_id)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: str) -> None:
        self.finish_request(req.request_id, reason)  # running, or preempted while its last token was pending

"""The simulated engines: a FIFO queue, a batch of at most `max_running` requests, an LRU set of
resident adapters each, and the adapter sets an endpoint picker scrapes (running, waiting).

Invariants: a request is in at most one engine's queue or batch; an adapter a running request
uses stays resident (`pins`), so with adapter_slots >= max_running a free batch seat always finds
a slot. Finish events go to the shared heap with the request's attempt number: an aborted attempt
(failure, rebalance) bumps `attempt[r]`, and its stale finish event is ignored.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque

from lorafleet.bench.fleet_setup import EngineModel

FINISH = 0  # heap event kind: (time, seq, FINISH, request, attempt)


class SimEngines:
    def __init__(self, model: EngineModel, max_engines: int, adapter_of, output_len, track_adapters: bool):
        self.model = model
        self.adapter_of = adapter_of  # request -> adapter (list of int)
        self.output_len = output_len  # request -> tokens (list of int)
        self.alive = [False] * max_engines
        self.queue = [deque() for _ in range(max_engines)]
        self.running = [set() for _ in range(max_engines)]
        self.cache = [OrderedDict() for _ in range(max_engines)]  # adapter -> None, LRU first
        self.pins = [{} for _ in range(max_engines)]  # adapter -> running requests using it
        self.track = track_adapters
        self.waiting = [{} for _ in range(max_engines)]  # adapter -> queued requests (tracked only)
        # adapter -> engines where it runs / waits: what the gateway scorer reads per request
        self.active_on: dict[int, set[int]] = {}
        self.waiting_on: dict[int, set[int]] = {}
        self.attempt = [0] * len(adapter_of)
        self.engine_of = [-1] * len(adapter_of)
        self.heap: list = []
        self.seq = 0
        self.on_start = None  # callback(request, engine, hit, now), set by the simulation

    # --- membership -----------------------------------------------------------------------
    def bring_up(self, engine: int) -> None:
        self.alive[engine] = True

    def take_all(self, engine: int, kill: bool) -> list[int]:
        """Abort every queued and running request of `engine` (oldest first); a killed engine
        also loses its resident adapters."""
        requests = sorted(self.running[engine]) + list(self.queue[engine])
        for r in requests:
            self.attempt[r] += 1
            self.engine_of[r] = -1
        for a in list(self.pins[engine]):
            self._unmark(self.active_on, a, engine)
        for a in list(self.waiting[engine]):
            self._unmark(self.waiting_on, a, engine)
        self.running[engine].clear()
        self.queue[engine].clear()
        self.pins[engine].clear()
        self.waiting[engine].clear()
        if kill:
            self.alive[engine] = False
            self.cache[engine].clear()
        return requests

    # --- requests -------------------------------------------------------------------------
    def enqueue(self, engine: int, request: int, now: float) -> None:
        self.engine_of[request] = engine
        self.queue[engine].append(request)
        if self.track:
            a = self.adapter_of[request]
            waiting = self.waiting[engine]
            waiting[a] = waiting.get(a, 0) + 1
            self.waiting_on.setdefault(a, set()).add(engine)
        self.fill(engine, now)

    def fill(self, engine: int, now: float) -> None:
        queue, running, cache, pins = self.queue[engine], self.running[engine], self.cache[engine], self.pins[engine]
        model = self.model
        while queue and len(running) < model.max_running:
            r = queue.popleft()
            a = self.adapter_of[r]
            if self.track:
                self._decrement(self.waiting[engine], self.waiting_on, a, engine)
            hit = a in cache
            if hit:
                cache.move_to_end(a)
            else:
                cache[a] = None
                if len(cache) > model.adapter_slots:
                    self._evict(cache, pins)
            if a in pins:
                pins[a] += 1
            else:
                pins[a] = 1
                if self.track:
                    self.active_on.setdefault(a, set()).add(engine)
            running.add(r)
            service = self.output_len[r] * model.decode_step_s + (0.0 if hit else model.adapter_load_s)
            self.seq += 1
            heapq.heappush(self.heap, (now + service, self.seq, FINISH, r, self.attempt[r]))
            self.on_start(r, engine, hit, now)

    def finish(self, request: int, now: float) -> int:
        engine = self.engine_of[request]
        self.running[engine].discard(request)
        self.engine_of[request] = -1
        a = self.adapter_of[request]
        pins = self.pins[engine]
        pins[a] -= 1
        if not pins[a]:
            del pins[a]
            if self.track:
                self._unmark(self.active_on, a, engine)
        self.fill(engine, now)
        return engine

    @staticmethod
    def _evict(cache: OrderedDict, pins: dict) -> None:
        for a in cache:  # least recently used first; at most max_running are pinned
            if a not in pins:
                del cache[a]
                return

    @staticmethod
    def _decrement(counts: dict, index: dict, adapter: int, engine: int) -> None:
        counts[adapter] -= 1
        if not counts[adapter]:
            del counts[adapter]
            SimEngines._unmark(index, adapter, engine)

    @staticmethod
    def _unmark(index: dict, adapter: int, engine: int) -> None:
        engines = index.get(adapter)
        if engines is not None:
            engines.discard(engine)
            if not engines:
                del index[adapter]

    def distinct_adapters(self, engine: int) -> int:
        """len(running adapters) + len(waiting adapters), as vLLM's lora_requests_info counts them."""
        return len(self.pins[engine]) + len(self.waiting[engine])

"""What one fleet-simulation run measures, per request, per time window and per engine.

hit: the request's (last) start found its adapter resident on the engine. Adapter loads: every
start that did not (aborted attempts count: the load happened). Load imbalance: per window of
`imbalance_window_s`, the busiest engine's started requests over the mean, among the engines up
for the whole window; overall: the same over the run's engines that never went down or came up.
Queueing delay: the last start minus the arrival (redelivery after a failure or a rebalance
counts: the client waited).
"""

from __future__ import annotations

import math

import numpy as np

from lorafleet.bench.fleet_setup import FleetSetup, Trace


class RunMetrics:
    def __init__(self, setup: FleetSetup, n_requests: int, adapter_of: list[int]) -> None:
        self.setup = setup
        self.adapter_of = adapter_of
        self.used = [set() for _ in range(setup.max_engines)]  # engine -> adapters it ran: its node's store
        self.start = [math.nan] * n_requests
        self.hit = bytearray(n_requests)
        self.done = bytearray(n_requests)  # completions per request: exactly one each, checked
        self.loads = 0
        self.restarts = 0  # attempts aborted by failures and rebalances
        self.routing_s = 0.0  # time inside the policy's routing call, all requests
        self.last_completion = 0.0
        horizon = setup.duration_s * 3 + 120  # arrivals end at duration_s; queues drain after
        self.series = {key: [0] * int(horizon / setup.series_window_s + 1) for key in ("starts", "hits", "done")}
        windows = int(setup.duration_s / setup.imbalance_window_s)
        self.engine_starts = [[0] * setup.max_engines for _ in range(windows)]
        self.up_from = [0.0] * setup.engines + [math.inf] * (setup.max_engines - setup.engines)
        self.up_to = [math.inf] * setup.max_engines

    def started(self, r: int, engine: int, hit: bool, now: float) -> None:
        self.start[r] = now
        self.hit[r] = hit
        self.used[engine].add(self.adapter_of[r])
        w = min(int(now / self.setup.series_window_s), len(self.series["starts"]) - 1)
        self.series["starts"][w] += 1
        if hit:
            self.series["hits"][w] += 1
        else:
            self.loads += 1
        k = int(now / self.setup.imbalance_window_s)
        if k < len(self.engine_starts):
            self.engine_starts[k][engine] += 1

    def completed(self, r: int, now: float) -> None:
        self.done[r] += 1
        self.last_completion = now
        self.series["done"][min(int(now / self.setup.series_window_s), len(self.series["done"]) - 1)] += 1

    def engine_down(self, engine: int, now: float) -> None:
        self.up_to[engine] = now

    def engine_up(self, engine: int, now: float) -> None:
        self.up_from[engine] = now

    def summary(self, policy: str, partitions: int | None, trace: Trace) -> dict:
        setup = self.setup
        done = np.frombuffer(bytes(self.done), dtype=np.uint8)
        hit = np.frombuffer(bytes(self.hit), dtype=np.uint8)[done > 0]
        delay = (np.array(self.start) - trace.arrival)[done > 0]
        windows = self._imbalance_per_window()
        first_event = min((e.at_s for e in setup.events), default=setup.duration_s)
        longest = setup.output_range[1] * setup.engine.decode_step_s  # served before the event, if not queued
        arrival = trace.arrival[done > 0]
        steady = (arrival >= first_event / 2) & (arrival < first_event - longest)  # warm caches, no event yet
        return {
            "policy": policy, "partitions": partitions, "requests": len(trace),
            "served_once": bool((done == 1).all()), "unserved": int((done == 0).sum()),
            "served_twice_or_more": int((done > 1).sum()),
            "hit_rate": float(hit.mean()) if len(hit) else 0.0,
            # per second of arrivals (loads per request x the arrival rate): drains differ in length
            "adapter_loads": self.loads, "adapter_loads_per_s": self.loads / setup.duration_s,
            "restarted_attempts": self.restarts,
            "queue_delay_p50_s": float(np.percentile(delay, 50)), "queue_delay_p99_s": float(np.percentile(delay, 99)),
            "queue_delay_mean_s": float(delay.mean()),
            "steady_hit_rate": float(hit[steady].mean()) if steady.any() else 0.0,
            "steady_delay_p99_s": float(np.percentile(delay[steady], 99)) if steady.any() else 0.0,
            "imbalance_overall": self._imbalance_overall(),
            "imbalance_window_mean": float(np.mean(windows)) if windows else None,
            "imbalance_window_max": float(np.max(windows)) if windows else None,
            "routing_us_per_request": self.routing_s / len(trace) * 1e6,
            **self._working_sets(),
            "last_completion_s": self.last_completion,
            "series": self._series(trace, delay, done > 0),
        }

    def _working_sets(self) -> dict:
        """Distinct adapters each engine, and each node of `engines_per_node` of the starting
        engines (consecutive ids), ran over the whole run: what a node's adapter store serves."""
        setup = self.setup
        steady = [len(self.used[e]) for e in range(setup.engines) if self._steady(e, 0.0, math.inf)]
        size = setup.engines_per_node
        nodes = [len(set().union(*self.used[n:n + size])) for n in range(0, setup.engines - size + 1, size)]
        return {"adapters_per_engine": float(np.mean(steady)) if steady else 0.0,
                "adapters_per_node": float(np.mean(nodes)) if nodes else 0.0,
                "adapters_per_node_max": max(nodes, default=0)}

    def _steady(self, engine: int, start: float, end: float) -> bool:
        return self.up_from[engine] <= start and self.up_to[engine] >= end

    def _imbalance_per_window(self) -> list[float]:
        out, width = [], self.setup.imbalance_window_s
        for k, starts in enumerate(self.engine_starts):
            loads = [s for e, s in enumerate(starts) if self._steady(e, k * width, (k + 1) * width)]
            if loads and sum(loads):
                out.append(max(loads) / (sum(loads) / len(loads)))
        return out

    def _imbalance_overall(self) -> float:
        totals = np.array(self.engine_starts).sum(axis=0)
        loads = [t for e, t in enumerate(totals.tolist()) if self._steady(e, 0.0, math.inf)]
        return max(loads) / (sum(loads) / len(loads)) if loads and sum(loads) else 0.0

    def _series(self, trace: Trace, delay: np.ndarray, served: np.ndarray) -> dict:
        width = self.setup.series_window_s
        n = math.ceil(max(self.last_completion, self.setup.duration_s) / width)
        starts, hits, done = (np.array(self.series[k][:n], dtype=float) for k in ("starts", "hits", "done"))
        arrivals = np.histogram(trace.arrival, bins=n, range=(0, n * width))[0]
        delay_sum = np.histogram(trace.arrival[served], bins=n, range=(0, n * width), weights=delay)[0]
        served_count = np.histogram(trace.arrival[served], bins=n, range=(0, n * width))[0]
        return {
            "t_s": [round((i + 0.5) * width, 3) for i in range(n)],
            "hit_rate": [None if s == 0 else round(h / s, 4) for h, s in zip(hits, starts)],  # None: nothing started
            "adapter_loads_per_s": ((starts - hits) / width).round(1).tolist(),
            "completed_per_s": (done / width).round(1).tolist(),
            "arrivals_per_s": (arrivals / width).round(1).tolist(),
            "delay_mean_s": np.divide(delay_sum, served_count, out=np.zeros(n),
                                      where=served_count > 0).round(3).tolist(),
        }

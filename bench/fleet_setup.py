"""The fleet simulation's setup (typed, frozen) and its request trace (numpy, one seed).

Engine model, derived from this project's measurements (bench/results/h200/897744e/tables:
S1 on one H200 served 23-26 requests/s with outputs uniform in [8, 512), i.e. ~6,000 tokens/s):
an engine runs up to `max_running` requests at once, each for `output_len * decode_step_s`
seconds (a request's share of a batched decode: 64 / (259.5 * 0.010 s) = 24.7 requests/s per
engine), plus `adapter_load_s` when its adapter is not resident. `adapter_slots` adapters stay
resident on the GPU, least recently used evicted first, never one a running request uses
(lorafleet's default MAX_ADAPTER_SLOTS: twice the batch).

Trace: adapter popularity as S-LoRA draws it (`numpy power(alpha) * adapters`: alpha 1 is
uniform, smaller is more skewed); Gamma inter-arrivals with coefficient of variation `cv` in an
operational time that a slow wave of +-`wave_amplitude` warps (a diurnal swing compressed into the
run); the mean rate is `load` times the fleet's starting capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class EngineModel:
    max_running: int = 64  # requests in one engine's batch at once
    adapter_slots: int = 128  # adapters resident on its GPU (LRU; a running request's adapter stays)
    decode_step_s: float = 0.010  # seconds per output token of one request in a full batch
    adapter_load_s: float = 0.05  # a miss: the adapter from the node's store into the GPU pool

    def capacity_rps(self, mean_output_tokens: float) -> float:
        return self.max_running / (mean_output_tokens * self.decode_step_s)


@dataclass(frozen=True)
class FleetEvent:
    at_s: float
    kind: str  # "fail" (engines die: in-flight work is redelivered, caches lost) or "join"
    engines: int


@dataclass(frozen=True)
class FleetSetup:
    engines: int = 1000
    adapters: int = 100_000
    duration_s: float = 60.0
    load: float = 0.8  # mean arrival rate over the fleet's starting capacity
    cv: float = 2.0  # of the Gamma inter-arrival times (1: Poisson; larger: burstier)
    wave_amplitude: float = 0.15
    wave_period_s: float = 60.0
    output_range: tuple[int, int] = (8, 512)
    engine: EngineModel = field(default_factory=EngineModel)
    events: tuple[FleetEvent, ...] = (FleetEvent(20.0, "fail", 50), FleetEvent(40.0, "join", 50))
    session_timeout_s: float = 10.0  # a dead member leaves the group (or the endpoint pool) after this
    rebalance_s: float = 2.0  # no partition is consumed while the group rebalances (eager protocol)
    restart_on_rebalance: bool = True  # every member's revoke aborts its in-flight requests
    hot_adapter_rps: float = 20.0  # Router's per-partition rate (LORAFLEET_HOT_ADAPTER_RPS)
    hot_window_s: float = 10.0  # Router's rate window (LORAFLEET_HOT_WINDOW_S)
    series_window_s: float = 2.0  # bucket of the time series
    imbalance_window_s: float = 10.0  # bucket of max/mean engine load
    engines_per_node: int = 8  # GPUs of one node sharing its adapter store (consecutive engine ids)
    seed: int = 42

    @property
    def mean_output(self) -> float:
        return (self.output_range[0] + self.output_range[1] - 1) / 2

    @property
    def rate_rps(self) -> float:
        return self.load * self.engines * self.engine.capacity_rps(self.mean_output)

    @property
    def max_engines(self) -> int:
        return self.engines + sum(e.engines for e in self.events if e.kind == "join")


@dataclass(frozen=True)
class Trace:
    arrival: np.ndarray  # float64 seconds, ascending
    adapter: np.ndarray  # int64 in [0, adapters)
    output_len: np.ndarray  # int64 tokens

    def __len__(self) -> int:
        return len(self.arrival)


def generate_fleet_trace(setup: FleetSetup, alpha: float) -> Trace:
    rng = np.random.default_rng(setup.seed)
    rate, duration = setup.rate_rps, setup.duration_s
    count = int(rate * duration * (1 + setup.wave_amplitude) * 1.2) + 100
    shape, scale = 1.0 / (setup.cv * setup.cv), setup.cv * setup.cv / rate
    operational = np.cumsum(rng.gamma(shape, scale, count))
    arrival = _warp(operational, setup)
    arrival = arrival[arrival < duration]
    n = len(arrival)
    adapter = (rng.power(alpha, n) * setup.adapters).astype(np.int64)
    output_len = rng.integers(setup.output_range[0], setup.output_range[1], n)
    return Trace(arrival, np.minimum(adapter, setup.adapters - 1), output_len)


def _warp(operational: np.ndarray, setup: FleetSetup) -> np.ndarray:
    """Real time t of operational time s = Lambda(t) = t + A*T/(2 pi) * (1 - cos(2 pi t / T)):
    the rate at t is (1 + A sin(2 pi t / T)) times the mean."""
    amplitude, period = setup.wave_amplitude, setup.wave_period_s
    horizon = max(setup.duration_s, float(operational[-1])) * 1.5 + period
    grid = np.linspace(0.0, horizon, int(horizon * 50) + 2)
    cumulative = grid + amplitude * period / (2 * math.pi) * (1 - np.cos(2 * math.pi * grid / period))
    return np.interp(operational, cumulative, grid)

"""The S-LoRA benchmark workload, generated as S-LoRA's own scripts do (see shared DESIGN.md).

Draw order with numpy's global generator seeded once: adapter popularity (power distribution),
input lengths, output lengths, then Gamma inter-arrival times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TraceRequest:
    index: int
    adapter: int  # adapter number in [0, n)
    input_len: int
    output_len: int
    arrival: float  # seconds from the trace's start


@dataclass(frozen=True)
class Setting:
    name: str
    shape: str  # bench/shapes.py
    ranks: tuple[int, ...]  # assigned round robin over adapter numbers
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


SETTINGS = {
    "S1": Setting("S1", "7b", (8,)),
    "S2": Setting("S2", "7b", (64, 32, 16, 8)),
    "S4": Setting("S4", "13b", (64, 32, 16)),
    "tiny": Setting("tiny", "tiny", (8, 4)),
}


def generate_trace(n_adapters: int, alpha: float, rate: float, cv: float, duration: float,
                   input_range=(8, 512), output_range=(8, 512), seed: int = 42) -> list[TraceRequest]:
    np.random.seed(seed)
    total = int(rate * duration)
    adapters = (np.random.power(alpha, total) * n_adapters).astype(int)
    inputs = np.random.randint(input_range[0], input_range[1], total)
    outputs = np.random.randint(output_range[0], output_range[1], total)
    shape, scale = 1.0 / (cv * cv), cv * cv / rate
    intervals = np.random.gamma(shape, scale, total)
    arrivals = np.cumsum(intervals)
    return [TraceRequest(i, int(adapters[i]), int(inputs[i]), int(outputs[i]), float(arrivals[i])) for i in range(total)]


def add_trace_arguments(p, warmup_help: str) -> None:
    """The trace options shared by the baselines' command lines (merged models, end to end)."""
    p.add_argument("--setting", choices=sorted(SETTINGS), default="S1")
    p.add_argument("--n", type=int, nargs="+", default=[5, 100])
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=0.0, help=warmup_help)
    p.add_argument("--max-len", type=int, default=512, help="lengths uniform in [8, max-len) (CPU smoke runs: less)")
    p.add_argument("--max-num-seqs", type=int, default=512)

"""Shared pieces of the kernel microbenchmarks: timing with a cold L2, the measured ceilings, rows.

Timing: triton.testing.do_bench (CUDA events, median), which clears the L2 cache before every
repetition. Kernels and the capturable baselines are timed as CUDA-graph replays (GPU time, as
the engine's captured decode step runs them); `triton_eager` rows time the plain Python call,
host launch path included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton.testing


def run_with_out_and_commit(doc: str, default_out: str, run) -> None:
    """The command line of a one-call GPU benchmark: --out (results folder), --commit -> run(out, commit)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(default_out))
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    run(args.out, args.commit)


def time_ms(fn, warmup: int = 10, rep: int = 40) -> float:
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_graph_ms(fn, warmup: int = 10, rep: int = 40) -> float:
    """GPU time of fn captured in a CUDA graph (as the engine runs a decode step): no host launch cost."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = time_ms(graph.replay, warmup, rep)
    del graph
    return ms


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (read + write) and bf16 matmul rate, measured here."""
    src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    copy_bps = 2 * src.numel() * 2 / (ms * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b)
    flops = 2 * 8192**3 / (ms * 1e-3)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy_bps, "bf16_matmul_flop_per_s": flops}


@dataclass
class Row:
    bench: str  # e.g. "lora_decode"
    config: dict
    impl: str  # triton | torch_ref | bmm_padded | dense_matmul
    ms: float
    bytes: float = 0.0  # bytes the op must move (each input once, each output once)
    flops: float = 0.0
    extra: dict = field(default_factory=dict)

    def finish(self, ceilings: dict) -> "Row":
        sec = self.ms * 1e-3
        self.extra["bytes_per_s"] = self.bytes / sec if self.bytes else 0.0
        self.extra["flop_per_s"] = self.flops / sec if self.flops else 0.0
        self.extra["pct_bandwidth"] = 100 * self.extra["bytes_per_s"] / ceilings["copy_bytes_per_s"]
        self.extra["pct_matmul"] = 100 * self.extra["flop_per_s"] / ceilings["bf16_matmul_flop_per_s"]
        return self


def write_json(path: Path, meta: dict, rows: list[Row]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))


def gb(x: float) -> str:
    return f"{x / 1e9:.0f}"


def git_commit() -> str:
    """The checkout's commit, or "unknown" where there is no git (the device: pass --commit)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

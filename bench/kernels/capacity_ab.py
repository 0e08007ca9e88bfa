"""Decode LoRA under a CUDA-graph rank capacity above the adapters' ranks: expand's small-rank tiles
on and off, in one process, on a Llama-7B layer (bf16, graph replays, cold L2).

A decode step captured at capacity 64 runs every adapter's expand with 64-row B^T tiles of 128
columns; a segment of rank <= 16 can stream 16 x 256 tiles instead (lora_kernels.lora_expand_kernel).
Here: 64 decode tokens over 32 adapters of rank 8, 16 and 64 (and a mix), q/k/v (3 slices) and
o_proj (1 slice), capture mode at capacity 64, timed with the small-rank path and with it compiled
out (`expand_small_r` = the capacity). Shrink is timed too (unchanged by the switch: a control).

    python -m lorafleet.bench.kernels.capacity_ab --out bench/results/kernels/capacity-ab
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

import lorafleet.kernels.lora_ops as lora_ops
from lorafleet.bench.kernels.common import run_with_out_and_commit, time_graph_ms
from lorafleet.bench.report import environment
from lorafleet.kernels.lora_ops import TritonLoraOps
from tests.kernels.kernel_fixtures import O_PROJ, QKV, make_decode_round_robin, make_spec

SPEC = make_spec(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, layers=1)
CAPACITY, TOKENS, ADAPTERS = 64, 64, 32
MIXES = {"r8": (8,), "r16": (16,), "r64": (64,), "S2 mix 64/32/16/8": (64, 32, 16, 8)}
_choose_tiles = lora_ops.choose_tiles


def _small_path(on: bool) -> None:
    def choose(rank_cap, decode, page_elems):
        tiles = _choose_tiles(rank_cap, decode, page_elems)
        return tiles if on else dataclasses.replace(tiles, expand_small_r=tiles.expand_block_r)

    lora_ops.choose_tiles = choose


def run(out: Path, commit: str | None) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for mix, ranks in MIXES.items():
        ctx = make_decode_round_robin(SPEC, ranks, ADAPTERS, TOKENS, torch.bfloat16, "cuda", gen)
        tables = ctx.tables
        for group, modules in (("qkv", QKV), ("o", O_PROJ)):
            k = tables.module_shapes[modules[0]][0]
            outs = [tables.module_shapes[m][1] for m in modules]
            offsets = tuple(sum(outs[:i]) for i in range(len(modules)))
            x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
            y = torch.randn(TOKENS, sum(outs), device="cuda", dtype=torch.bfloat16)
            for on in (False, True):
                _small_path(on)
                ops = TritonLoraOps(capture=True, max_rank=CAPACITY)
                u = ops.shrink(x, 0, modules, ctx)
                shrink_ms = time_graph_ms(lambda: ops.shrink(x, 0, modules, ctx))
                expand_ms = time_graph_ms(lambda: ops.expand(y, u, 0, modules, offsets, ctx))
                rows.append({"mix": mix, "group": group, "small_path": on, "shrink_us": 1e3 * shrink_ms,
                             "expand_us": 1e3 * expand_ms})
                print(json.dumps(rows[-1]), flush=True)
        del ctx, tables
        torch.cuda.empty_cache()
    _small_path(True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity-ab.json").write_text(json.dumps({"environment": environment(commit), "capacity": CAPACITY,
                                                      "tokens": TOKENS, "adapters": ADAPTERS, "rows": rows}, indent=1))
    lines = ["# Decode expand under capacity 64: small-rank tiles off / on (µs, graph replays)", "",
             f"commit `{environment(commit).get('commit')}`; {TOKENS} tokens over {ADAPTERS} adapters, bf16, 7B layer", "",
             "| adapters' ranks | group | expand off | expand on | shrink off | shrink on |", "|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        off, on = rows[i], rows[i + 1]
        lines.append(f"| {off['mix']} | {off['group']} | {off['expand_us']:.1f} | {on['expand_us']:.1f} | "
                     f"{off['shrink_us']:.1f} | {on['shrink_us']:.1f} |")
    (out / "capacity-ab.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    run_with_out_and_commit(__doc__, "bench/results/kernels/capacity-ab", run)

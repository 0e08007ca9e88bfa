"""Decode LoRA of a layer under CUDA-graph capture: how far to split the small decode grids, and
whether the cast between shrink and expand is worth a graph node. One process, one GPU.

The engine's captured decode step runs, per layer, q/k/v shrink + expand and o shrink + expand
(S1 / S2 adapters target q/k/v/o). The fixed-batch probe put that at 19-24% of a 7B decode step
on an H200, ~19 µs per op, far above the bytes it moves (bench/results/tp/7cd2d4d/NOTES.md).
Here: those four ops for LAYERS layers of the 7B shape, 64 decode tokens over 32 adapters in 64
segments (the engine's batch-64 graph), capture mode at rank capacity 64, timed as one graph
replay per variant (cold L2), divided by the layers:

- `shrink_programs_per_sm` x `expand_programs_per_sm` (lorafleet.kernels.lora_tiles.LoraLaunch): how many
  programs per multiprocessor the K splits of shrink and the column splits of expand aim at;
- `cast`: shrink's float32 u cast to bf16 before expand (the path before this change) against
  expand rounding it as it loads it;
- the rank capacity itself (default launch): a graph captured at 16 or 32 instead of 64 for a
  batch whose adapters all have rank <= 16 (what graphs per rank tier would give S1).

Tokens are checked against the torch reference once per mix (the variant with the default launch).

    python -m lorafleet.bench.kernels.launch_sweep --out bench/results/kernels/launch-sweep
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafleet.bench.kernels.common import run_with_out_and_commit, time_graph_ms
from lorafleet.bench.report import environment
from lorafleet.engine.ops.base import LoraContext
from lorafleet.kernels.lora_ops import TritonLoraOps
from lorafleet.kernels.lora_tiles import LoraLaunch
from tests.kernels.kernel_fixtures import O_PROJ, QKV, make_decode_round_robin, make_spec

LAYERS, CAPACITY, TOKENS, ADAPTERS = 8, 64, 64, 32
SPEC = make_spec(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, layers=LAYERS)
MIXES = {"r8 (S1)": (8,), "S2 mix 64/32/16/8": (64, 32, 16, 8)}
PER_SM = (2, 4, 8, 16, 32)
SMALL_CAPACITIES = (16, 32)  # timed for the mixes whose ranks fit them


def _layer_ops(ops: TritonLoraOps, ctx: LoraContext, xs: dict, ys: dict, cast: bool):
    """The step's LoRA work over LAYERS layers: q/k/v and o, shrink then expand."""
    groups = [(QKV, xs["qkv"], ys["qkv"], _offsets(ctx, QKV)), (O_PROJ, xs["o"], ys["o"], (0,))]

    def run() -> None:
        for layer in range(LAYERS):
            for modules, x, y, offsets in groups:
                u = ops.shrink(x, layer, modules, ctx)
                ops.expand(y, u.to(y.dtype) if cast else u, layer, modules, offsets, ctx)

    return run


def _offsets(ctx: LoraContext, modules) -> tuple[int, ...]:
    outs = [ctx.tables.module_shapes[m][1] for m in modules]
    return tuple(sum(outs[:i]) for i in range(len(modules)))


def run(out: Path, commit: str | None) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for mix, ranks in MIXES.items():
        ctx = make_decode_round_robin(SPEC, ranks, ADAPTERS, TOKENS, torch.bfloat16, "cuda", gen)
        xs = {"qkv": torch.randn(TOKENS, SPEC.hidden_size, device="cuda", dtype=torch.bfloat16),
              "o": torch.randn(TOKENS, SPEC.q_width, device="cuda", dtype=torch.bfloat16)}
        ys = {"qkv": torch.zeros(TOKENS, SPEC.q_width + 2 * SPEC.kv_width, device="cuda", dtype=torch.bfloat16),
              "o": torch.zeros(TOKENS, SPEC.hidden_size, device="cuda", dtype=torch.bfloat16)}
        _check_against_reference(ctx, xs, mix)
        variants = [(s, e, False) for s in PER_SM for e in PER_SM] + [(4, 4, True)]
        for s, e, cast in variants:
            ops = TritonLoraOps(capture=True, max_rank=CAPACITY, launch=LoraLaunch(s, e))
            us = 1e3 * time_graph_ms(_layer_ops(ops, ctx, xs, ys, cast)) / LAYERS
            rows.append({"mix": mix, "capacity": CAPACITY, "shrink_programs_per_sm": s, "expand_programs_per_sm": e,
                         "cast": cast, "layer_lora_us": us})
            print(json.dumps(rows[-1]), flush=True)
        for cap in (c for c in SMALL_CAPACITIES if c >= max(ranks)):
            ops = TritonLoraOps(capture=True, max_rank=cap)
            us = 1e3 * time_graph_ms(_layer_ops(ops, ctx, xs, ys, False)) / LAYERS
            rows.append({"mix": mix, "capacity": cap, "shrink_programs_per_sm": 4, "expand_programs_per_sm": 4,
                         "cast": False, "layer_lora_us": us})
            print(json.dumps(rows[-1]), flush=True)
        del ctx
        torch.cuda.empty_cache()
    _write(out, commit, rows)
    return rows


def _check_against_reference(ctx: LoraContext, xs: dict, mix: str) -> None:
    """The captured-mode kernels give the reference's y for this batch (layer 0, both groups)."""
    from lorafleet.engine.ops.torch_ref import TorchLoraOps

    ops, ref = TritonLoraOps(capture=True, max_rank=CAPACITY), TorchLoraOps()
    for modules, x in ((QKV, xs["qkv"]), (O_PROJ, xs["o"])):
        width = sum(ctx.tables.module_shapes[m][1] for m in modules)
        got = torch.zeros(TOKENS, width, device="cuda", dtype=torch.bfloat16)
        want = got.clone()
        ops.expand(got, ops.shrink(x, 0, modules, ctx), 0, modules, _offsets(ctx, modules), ctx)
        ref.expand(want, ref.shrink(x, 0, modules, ctx), 0, modules, _offsets(ctx, modules), ctx)
        err = float((got.float() - want.float()).norm() / want.float().norm())
        if not err < 2e-2:
            raise AssertionError(f"{mix} modules {modules}: kernels differ from the reference, rel err {err:.2e}")


def _write(out: Path, commit: str | None, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = environment(commit)
    (out / "launch-sweep.json").write_text(json.dumps({"environment": env, "layers": LAYERS, "capacity": CAPACITY,
                                                       "tokens": TOKENS, "adapters": ADAPTERS, "rows": rows}, indent=1))
    lines = ["# Decode LoRA per layer (q/k/v + o, shrink + expand), µs: K / column splits (programs per SM)", "",
             f"commit `{env['commit']}`, {env['gpu']}; {TOKENS} tokens over {ADAPTERS} adapters in {TOKENS} segments, "
             f"capture mode at rank capacity {CAPACITY}, bf16, 7B layer, one graph of {LAYERS} layers", "",
             f"command: `{env['command']}`", ""]
    for mix in MIXES:
        mine = [r for r in rows if r["mix"] == mix and not r["cast"] and r["capacity"] == CAPACITY]
        lines += [f"## {mix} (rows: shrink programs per SM; columns: expand programs per SM)", "",
                  "| shrink \\ expand | " + " | ".join(str(e) for e in PER_SM) + " |", "|---" * (len(PER_SM) + 1) + "|"]
        for s in PER_SM:
            cells = [f"{r['layer_lora_us']:.1f}" for e in PER_SM for r in mine
                     if r["shrink_programs_per_sm"] == s and r["expand_programs_per_sm"] == e]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        cast = next(r for r in rows if r["mix"] == mix and r["cast"])
        best = min(mine, key=lambda r: r["layer_lora_us"])
        lines += ["", f"- with the cast node (4, 4): {cast['layer_lora_us']:.1f} µs; best: "
                  f"({best['shrink_programs_per_sm']}, {best['expand_programs_per_sm']}) {best['layer_lora_us']:.1f} µs"]
        lines += [f"- captured at rank capacity {r['capacity']} instead of {CAPACITY} (4, 4): {r['layer_lora_us']:.1f} µs"
                  for r in rows if r["mix"] == mix and r["capacity"] != CAPACITY] + [""]
    (out / "launch-sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run_with_out_and_commit(__doc__, "bench/results/kernels/launch-sweep", run)

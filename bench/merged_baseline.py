"""Baseline: one merged model per adapter (what the S-LoRA paper's vLLM-packed does), while it fits.

Each adapter the trace uses gets its own engine in this process: its own copy of the base weights
with that adapter merged in place (W += scale * B @ A), its own KV pool (the free memory split
evenly), its own CUDA graphs. Requests go to their adapter's engine, served with no LoRA at all;
engines are stepped round robin (one process: the GPU runs one engine's step at a time, as
time-sliced vLLM processes would). When k copies plus a minimal KV pool each do not fit, the
record says so and why.

    python -m lorafleet.bench.merged_baseline --setting S1 --n 5 100 --warmup 1 --out bench/results/h200
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import torch

from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.engine_bench import make_prompts
from lorafleet.bench.metrics import Timeline
from lorafleet.bench.report import write_results
from lorafleet.bench.roofline import Shape
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.workload import SETTINGS, add_trace_arguments, generate_trace
from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams
from lorafleet.engine.memory.layout import PoolGeometry
from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import ModelSpec

HEADROOM_BYTES = 2 << 30  # per copy: activations, CUDA-graph pool, allocator slack


def merge_adapter(engine: LLMEngine, weights: LoraWeights) -> None:
    """W += scale * B @ A for every target, in place in the engine's fused weights (the captured
    CUDA graphs read the same tensors, so they see the merged model)."""
    s = engine.spec
    rows = {"q_proj": ("qkv", 0), "k_proj": ("qkv", s.q_width), "v_proj": ("qkv", s.q_width + s.kv_width),
            "o_proj": ("o", 0), "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", s.intermediate_size),
            "down_proj": ("down", 0)}
    for t in weights.config.targets:
        name, start = rows[t.module]
        w = getattr(engine.model.w.layers[t.layer], name)  # [out_total, in]
        a = weights.a[(t.layer, t.module)].to(w.device, torch.float32)  # [r, in]
        b = weights.b[(t.layer, t.module)].to(w.device, torch.float32)  # [out, r]
        part = w[start : start + b.shape[0]]
        part.copy_((part.float() + t.scale * (b @ a)).to(w.dtype))


def plan(spec: ModelSpec, shape: str, copies: int, free_bytes: int, fraction: float, min_kv_tokens: int,
         block_size: int = 16) -> tuple[int, str]:
    """Pages per copy, or 0 and the reason it does not fit."""
    weights = Shape.named(shape).weight_bytes if shape in ("7b", "13b") else 0
    page_bytes = PoolGeometry.for_model(spec, 1, block_size).page_bytes(2)
    budget = int(free_bytes * fraction) - copies * (weights + HEADROOM_BYTES)
    pages = budget // copies // page_bytes if budget > 0 else 0
    need = -(-min_kv_tokens // block_size)
    if pages < need:
        return 0, (f"{copies} copies x ({weights / 1e9:.1f} GB weights + {HEADROOM_BYTES / 1e9:.1f} GB headroom) "
                   f"+ {min_kv_tokens} tokens of KV each need more than {fraction:.0%} of {free_bytes / 1e9:.0f} GB free")
    return pages, ""


def serve(engines: dict[int, LLMEngine], trace, vocab: int, tag: str) -> dict:
    prompts = dict(zip((r.index for r in trace), make_prompts(trace, vocab)))  # by request index
    times = Timeline()
    steps = peak_kv = 0
    pending = deque(trace)
    order = list(engines)
    t0 = time.perf_counter()
    while pending or any(e.has_unfinished() for e in engines.values()):
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            rid = f"{tag}-{r.index}"
            engines[r.adapter].add_request(rid, prompt_token_ids=prompts[r.index], params=SamplingParams(
                max_tokens=r.output_len, temperature=0, ignore_eos=True))
            times.arrival[rid] = r.arrival
        busy = [k for k in order if engines[k].has_unfinished()]
        if not busy:
            time.sleep(max(0.0, min(0.01, pending[0].arrival - now)))
            continue
        for k in busy:  # round robin: one step of every engine with work
            outs = engines[k].step()
            steps += 1
            times.record(outs, time.perf_counter() - t0)
        peak_kv = max(peak_kv, sum(e.kv.used_pages() * e.pool[:, 0].numel() * e.pool.element_size() for e in engines.values()))
    return {**times.summary(), "steps": steps, "peak_kv_gb": peak_kv / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trace_arguments(p, warmup_help="seconds of the trace served first, not recorded")
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--memory-fraction", type=float, default=0.90)
    p.add_argument("--min-kv-tokens", type=int, default=16384, help="a copy needs at least this much KV to count as fitting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    spec = ModelSpec.from_pretrained(model_dir)
    cuda = args.device.startswith("cuda")
    records = []
    for n in args.n:
        lengths = ((8, args.max_len), (8, args.max_len))
        trace = generate_trace(n, 1.0, args.rate, 1.0, args.duration, *lengths)
        used = sorted({r.adapter for r in trace})
        free = torch.cuda.mem_get_info()[0] if cuda else 64 << 30
        pages, reason = plan(spec, setting.shape, len(used), free, args.memory_fraction, args.min_kv_tokens)
        pages = pages if cuda else min(pages, 512)  # CPU smoke runs: small host pools
        rec = {"setting": setting.name, "mode": "merged", "n": n, "copies": len(used), "rate": args.rate,
               "duration": args.duration, "max_num_seqs": args.max_num_seqs}
        if not pages:
            records.append({**rec, "fits": False, "reason": reason})
            print(f"[merged] n={n}: does not fit: {reason}", flush=True)
            write_results(args.out, f"merged-{setting.name}", records, vars(args))
            continue
        t = time.time()
        bank = AdapterBank(spec, setting.ranks, setting.modules, torch.device(args.device))
        engines = {}
        for k in used:  # each engine makes the same random base weights (seed 0), then merges its adapter
            engines[k] = LLMEngine(EngineConfig(model_dir=str(model_dir), device=args.device, random_weights_seed=0,
                                                num_pages=pages, max_num_seqs=args.max_num_seqs,
                                                max_batched_tokens=args.max_batched_tokens, max_adapter_rank=8,
                                                max_adapter_slots=1))
            merge_adapter(engines[k], bank.get(k))
        build_s = time.time() - t
        print(f"[merged] n={n}: {len(used)} engines of {pages} pages built in {build_s:.1f}s", flush=True)
        if args.warmup > 0:
            warm = [r for r in generate_trace(n, 1.0, args.rate, 1.0, args.warmup, *lengths)
                    if r.adapter in engines]
            serve(engines, warm, spec.vocab_size, "warm")
        t = time.time()
        result = serve(engines, trace, spec.vocab_size, f"n{n}")
        rec = {**rec, "fits": True, "pages_per_copy": pages, "build_s": build_s, "wall_s": time.time() - t,
               "pool_gb": sum(e.pool.numel() * e.pool.element_size() for e in engines.values()) / 1e9, **result}
        print(f"[merged] {rec}", flush=True)
        records.append(rec)
        write_results(args.out, f"merged-{setting.name}", records, vars(args))
        for e in engines.values():
            e.close()
        del engines, bank
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Engine-level S-LoRA benchmark: the trace fed in process at its arrival times, as the paper's
server sees it. One JSON record per (setting, n, mode).

    python -m bench.engine_bench --setting S1 --n 5 100 2000 --rate 40 --duration 30 --out bench/results/engine
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from bench.adapters import AdapterBank
from bench.metrics import summarize
from bench.report import write_results
from bench.shapes import make_model_folder
from bench.workload import SETTINGS, generate_trace
from services.engine.engine import EngineConfig, LLMEngine, SamplingParams


def run_once(engine: LLMEngine, bank: AdapterBank | None, trace, vocab: int) -> dict:
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, vocab, r.input_len).tolist() for r in trace]
    if bank is not None:  # host copies made before the clock starts: the store's job, not the engine's
        for r in trace:
            bank.get(r.adapter)
    arrival, first, finish, out_tokens = {}, {}, {}, {}
    peak_kv = peak_adapter = steps = 0
    pending = deque(trace)
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            rid = str(r.index)
            adapter_id = None if bank is None else f"a{r.adapter}"
            engine.add_request(rid, prompt_token_ids=prompts[r.index], adapter_id=adapter_id,
                               adapter=None if bank is None else bank.get(r.adapter),
                               params=SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
            arrival[rid] = r.arrival
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, pending[0].arrival - now)))
            continue
        outs = engine.step()
        steps += 1
        t = time.perf_counter() - t0
        for o in outs:
            first.setdefault(o.request_id, t)
            if o.finished:
                finish[o.request_id], out_tokens[o.request_id] = t, o.num_output_tokens
        peak_kv = max(peak_kv, engine.kv.used_pages())
        peak_adapter = max(peak_adapter, engine.adapters.resident_pages())
    page_bytes = engine.pool[:, 0].numel() * engine.pool.element_size()
    return {
        **summarize(arrival, first, finish, out_tokens), "steps": steps,
        "peak_kv_gb": peak_kv * page_bytes / 1e9, "peak_adapter_gb": peak_adapter * page_bytes / 1e9,
        "adapter_loads": engine.adapters.num_loads, "adapter_evictions": engine.adapters.num_evictions,
        "preemptions": engine.scheduler.num_preemptions,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="S1")
    p.add_argument("--n", type=int, nargs="+", default=[5, 100, 2000])
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--base-only", action="store_true", help="also run the trace with no adapters (upper bound)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    p.add_argument("--commit", default=None, help="git commit of the code (read from git when omitted)")
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    records = []
    modes = [("lora", n) for n in args.n] + ([("base-only", 0)] if args.base_only else [])
    for mode, n in modes:
        cfg = EngineConfig(model_dir=str(model_dir), device=args.device, random_weights_seed=0,
                           max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                           max_adapter_rank=max(setting.ranks), num_pages=0 if args.device == "cuda" else 512)
        engine = LLMEngine(cfg)
        bank = None if mode == "base-only" else AdapterBank(engine.spec, setting.ranks, setting.modules, engine.device)
        trace = generate_trace(max(n, 1), args.alpha, args.rate, args.cv, args.duration)
        t = time.time()
        result = run_once(engine, bank, trace, engine.spec.vocab_size)
        rec = {"setting": setting.name, "mode": mode, "n": n, "rate": args.rate, "duration": args.duration,
               "cv": args.cv, "alpha": args.alpha, "ranks": list(setting.ranks), "wall_s": time.time() - t, **result}
        print(rec, flush=True)
        records.append(rec)
        del engine, bank
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_results(args.out, f"engine-{setting.name}", records, vars(args))


if __name__ == "__main__":
    main()

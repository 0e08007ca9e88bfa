"""Engine-level S-LoRA benchmark: the trace fed in process at its arrival times, as the paper's
server sees it. One engine per setting serves every run (each n, then base-only); one JSON record
per run, plus the roofline bound of each, written after every run.

    python -m lorafleet.bench.engine_bench --setting S1 --n 5 100 1000 2000 10000 --base-only --warmup 2 \
        --rate 50 --duration 15 --max-num-seqs 512 --out bench/results/h200

NOTE: runs share the engine, so each run uses its own request and adapter ids (f"n{n}-a{k}"),
starts with no cached adapter (clear_cached_adapters) and reports its own deltas of the
engine's cumulative counters (adapter loads, evictions, preemptions).
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.metrics import Timeline
from lorafleet.bench.report import write_results
from lorafleet.bench.roofline import estimate
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.workload import SETTINGS, generate_trace
from lorafleet.common.progress import counter_bar
from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams


def make_prompts(trace, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, r.input_len).tolist() for r in trace]


def clear_cached_adapters(engine: LLMEngine) -> None:
    """Evict every cached (unpinned) adapter: the next run starts with the pool free of this one's."""
    pages = engine.adapters.evictable_pages()
    if pages:
        engine.adapters.evict_for(pages)


def _counters(engine: LLMEngine) -> dict[str, int]:
    a = engine.adapters
    return {"adapter_loads": a.num_loads, "adapter_packs": a.host.num_packs, "adapter_evictions": a.num_evictions,
            "preemptions": engine.scheduler.num_preemptions, "graph_steps": engine.graph_steps,
            # engine-thread seconds: waiting for (or doing) packs, and issuing the copies of loads
            "pack_wait_s": a.host.wait_s, "load_host_s": a.upload_s}


def run_once(engine: LLMEngine, bank: AdapterBank | None, trace, vocab: int, tag: str = "run") -> dict:
    """Serve `trace` at its arrival times; the engine must be idle before and is idle after."""
    assert not engine.has_unfinished(), "run_once needs an idle engine"
    prompts = make_prompts(trace, vocab)
    t = time.perf_counter()
    distinct = sorted({r.adapter for r in trace}) if bank is not None else []
    for k in distinct:  # host copies made before the clock starts: the store's job, not the engine's
        bank.get(k)
    make_s = time.perf_counter() - t
    clear_cached_adapters(engine)
    before = _counters(engine)
    times = Timeline()
    peak_kv = peak_adapter = steps = 0
    pending = deque(trace)
    bar = counter_bar(len(trace), tag, "req")
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            rid = f"{tag}-{r.index}"
            engine.add_request(rid, prompt_token_ids=prompts[r.index],
                               adapter_id=None if bank is None else f"{tag}-a{r.adapter}",
                               adapter=None if bank is None else bank.get(r.adapter),
                               params=SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
            times.arrival[rid] = r.arrival
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, pending[0].arrival - now)))
            continue
        outs = engine.step()
        steps += 1
        times.record(outs, time.perf_counter() - t0)
        bar.update(sum(o.finished for o in outs))
        peak_kv = max(peak_kv, engine.kv.used_pages())
        peak_adapter = max(peak_adapter, engine.adapters.resident_pages())
    bar.close()
    after = _counters(engine)
    page_bytes = engine.pool[:, 0].numel() * engine.pool.element_size()
    host_bytes = sum(bank.get(k).nbytes for k in distinct) if bank is not None else 0
    return {
        **times.summary(), "steps": steps,
        "pool_gb": engine.pool.numel() * engine.pool.element_size() / 1e9,
        "peak_kv_gb": peak_kv * page_bytes / 1e9, "peak_adapter_gb": peak_adapter * page_bytes / 1e9,
        "distinct_adapters": len(distinct), "adapter_host_gb": host_bytes / 1e9, "make_adapters_s": make_s,
        **{k: after[k] - before[k] for k in after},
    }


def build_engine(setting_name: str, args) -> LLMEngine:
    setting = SETTINGS[setting_name]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    return LLMEngine(EngineConfig(model_dir=str(model_dir), device=args.device, random_weights_seed=0,
                                  max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                                  max_adapter_rank=max(setting.ranks), packed_adapter_bytes=args.packed_adapter_gb << 30,
                                  adapter_pack_threads=args.pack_threads,
                                  num_pages=args.num_pages or (0 if args.device.startswith("cuda") else 512)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="S1")
    p.add_argument("--packed-adapter-gb", type=int, default=0,
                   help="host memory for packed adapters (the engine's LRU; LORAFLEET_ENGINE_PACKED_ADAPTER_BYTES in the "
                        "service); 0: sized to the work")
    p.add_argument("--pack-threads", type=int, default=EngineConfig.adapter_pack_threads,
                   help="threads packing adapters (LORAFLEET_ENGINE_ADAPTER_PACK_THREADS in the service)")
    p.add_argument("--n", type=int, nargs="*", default=[5, 100, 2000])
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=512, help="lengths uniform in [8, max-len); 512 is S-LoRA's (CPU smoke runs: less)")
    p.add_argument("--base-only", action="store_true", help="also run the trace with no adapters (upper bound); "
                   "or give n = 0 in --n to place that run")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of the trace (5 adapters) served before the first run and not recorded: "
                        "compiles every kernel so the first run's first tokens do not pay for it")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--num-pages", type=int, default=0, help="pool pages; 0: sized from memory (CPU: 512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    p.add_argument("--commit", default=None, help="git commit of the code (read from git when omitted)")
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    lengths = ((8, args.max_len), (8, args.max_len))
    t = time.time()
    engine = build_engine(args.setting, args)
    print(f"[engine_bench] {setting.name}: engine built in {time.time() - t:.1f}s, "
          f"pool {engine.pool.numel() * engine.pool.element_size() / 1e9:.1f} GB", flush=True)
    if args.warmup > 0:
        t = time.time()
        warm = generate_trace(5, args.alpha, args.rate, args.cv, args.warmup, *lengths)
        run_once(engine, AdapterBank(engine.spec, setting.ranks, setting.modules, engine.device), warm,
                 engine.spec.vocab_size, tag="warm")
        print(f"[engine_bench] warmup: {len(warm)} requests in {time.time() - t:.1f}s", flush=True)
    records = []
    name = f"engine-{setting.name}"
    # n = 0 in --n is the base-only run at that position (the device scripts run the runs the
    # targets need first, so a stage cut short by its timeout loses the least useful ones)
    ns = list(args.n) + ([0] if args.base_only and 0 not in args.n else [])
    modes = [("base-only" if n == 0 else "lora", n) for n in ns]
    for mode, n in modes:
        trace = generate_trace(max(n, 1), args.alpha, args.rate, args.cv, args.duration, *lengths)
        bank = None if mode == "base-only" else AdapterBank(engine.spec, setting.ranks, setting.modules, engine.device)
        t = time.time()
        rec = {"setting": setting.name, "mode": mode, "n": n, "rate": args.rate, "duration": args.duration,
               "cv": args.cv, "alpha": args.alpha, "ranks": list(setting.ranks), "max_num_seqs": args.max_num_seqs}
        try:
            result = run_once(engine, bank, trace, engine.spec.vocab_size, tag=f"n{n}" if bank else "base")
        except Exception as exc:  # recorded, and no further run: the engine's state is unknown now
            records.append({**rec, "error": f"{type(exc).__name__}: {exc}"[:500]})
            write_results(args.out, name, records, vars(args))
            raise
        rec.update(wall_s=time.time() - t, **result)
        print(f"[engine_bench] {rec}", flush=True)
        roof = estimate(setting, trace, n, args.max_num_seqs, args.max_batched_tokens) if setting.shape != "tiny" else None
        records += [rec] + ([roof] if roof else [])
        write_results(args.out, name, records, vars(args))  # after every run: a killed stage keeps the rest
        del bank
    engine.close()


if __name__ == "__main__":
    main()

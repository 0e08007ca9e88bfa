"""Host overhead of engine steps on the GPU: wall time vs GPU kernel time for eager prefill steps
of several sizes and for graph-replayed decode steps, with the host ops that cost the most.

    python -m lorafleet.bench.profile_host --setting S1 --out bench/results/engine
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.report import environment
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.workload import SETTINGS
from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


PREFILLS = ((1, 64), (4, 128), (16, 256))  # (requests, prompt tokens) per eager prefill step


def _profiled_step(eng: LLMEngine) -> tuple[float, float, str]:
    """(wall ms, summed GPU kernel ms, top host ops table) of one engine step."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    _sync()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        eng.step()
        _sync()
        wall = (time.perf_counter() - t) * 1e3
    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    table = events.table(sort_by="self_cpu_time_total", row_limit=18)
    return wall, gpu_us / 1e3, table


def _adapter_loads(eng: LLMEngine, bank: AdapterBank, first: int, count: int) -> dict:
    """What one adapter costs the host: its pack (worker thread), then a load (acquire) into free
    pages, and the GPU time of `count` loads together. Adapters never seen before."""
    cache, ms = eng.adapters, lambda t: (time.perf_counter() - t) * 1e3
    ids = [(f"load{k}", bank.get(first + k)) for k in range(count)]
    t = time.perf_counter()
    for aid, w in ids:
        cache.stage(aid, w)
        cache.host.get(aid, w)  # waits for the worker's pack
    pack_ms = ms(t) / count
    _sync()
    t = time.perf_counter()
    for aid, w in ids:
        cache.acquire(aid, w)
    acquire_ms = ms(t) / count
    _sync()
    total_ms = ms(t)
    for aid, _ in ids:
        cache.release(aid)
    return {"adapters": count, "mb_each": ids[0][1].nbytes / 1e6, "pack_ms_each": pack_ms,
            "acquire_host_ms_each": acquire_ms, "loads_total_ms_incl_gpu": total_ms}


def _add(eng: LLMEngine, bank: AdapterBank, rid: str, n_tokens: int, adapter: int, max_tokens: int, rng) -> None:
    eng.add_request(rid, prompt_token_ids=rng.integers(3, 32000, n_tokens).tolist(), adapter_id=f"a{adapter}",
                    adapter=bank.get(adapter), params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--setting", default="S1")
    p.add_argument("--decode-batch", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    eng = LLMEngine(EngineConfig(model_dir=str(model_dir), random_weights_seed=0, num_pages=0 if torch.cuda.is_available() else 2048, max_num_seqs=512,
                                 max_batched_tokens=8192, max_adapter_rank=max(setting.ranks)))
    bank = AdapterBank(eng.spec, setting.ranks, setting.modules, eng.device)
    rng = np.random.default_rng(0)
    result: dict = {"environment": environment(args.commit), "args": vars(args) | {"out": str(args.out)}, "steps": []}
    tables = []
    k = 0
    for reqs, tokens in PREFILLS + PREFILLS:  # the second round is the measured one (warm caches)
        for _ in range(reqs):
            _add(eng, bank, f"p{k}", tokens, k % 32, 1, rng)
            k += 1
        wall, gpu, table = _profiled_step(eng)
        result["steps"].append({"kind": f"prefill {reqs}x{tokens}", "wall_ms": wall, "gpu_kernel_ms": gpu})
        tables.append(f"## prefill {reqs}x{tokens}: wall {wall:.1f} ms, GPU kernels {gpu:.1f} ms\n{table}")
        eng.run_to_completion()
    for i in range(args.decode_batch):
        _add(eng, bank, f"d{i}", 256, i % 64, 400, rng)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()
    for _ in range(5):
        eng.step()
    for _ in range(2):
        wall, gpu, table = _profiled_step(eng)
        result["steps"].append({"kind": f"decode {args.decode_batch}", "wall_ms": wall, "gpu_kernel_ms": gpu})
    tables.append(f"## decode {args.decode_batch}: wall {wall:.1f} ms, GPU kernels {gpu:.1f} ms\n{table}")
    eng.run_to_completion()
    result["adapter_loads"] = _adapter_loads(eng, bank, first=1000, count=16)
    print(json.dumps(result, indent=1))
    print("\n\n".join(tables))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile-host-{args.setting}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"profile-host-{args.setting}.txt").write_text("\n\n".join(tables))


if __name__ == "__main__":
    main()

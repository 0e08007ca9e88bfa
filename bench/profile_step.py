"""Where an engine step's time goes on the GPU: phases (host-timed, synchronized) and kernels.

    python -m lorafleet.bench.profile_step --setting S1 --batch 256 --distinct 64 --out bench/results/engine
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
from lorafleet.engine import batch as batch_mod
from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--setting", default="S1")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--distinct", type=int, default=64)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--base-only", action="store_true", help="the same batch without adapters (the LoRA cost's baseline)")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    p.add_argument("--commit", default=None, help="git commit of the code (read from git when omitted)")
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    eng = LLMEngine(EngineConfig(model_dir=str(model_dir), random_weights_seed=0, max_num_seqs=args.batch,
                                 max_batched_tokens=args.batch * args.context, max_adapter_rank=max(setting.ranks)))
    bank = AdapterBank(eng.spec, setting.ranks, setting.modules, eng.device)
    rng = np.random.default_rng(0)
    for i in range(args.batch):
        a = i % args.distinct
        eng.add_request(str(i), prompt_token_ids=rng.integers(3, 32000, args.context).tolist(),
                        adapter_id=None if args.base_only else f"a{a}", adapter=None if args.base_only else bank.get(a), params=SamplingParams(max_tokens=eng.spec.max_position - args.context, temperature=0, ignore_eos=True))
    eng.step()  # the whole prefill
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    import lorafleet.engine.engine as engine_mod

    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    engine_mod.build_batch = timed("build_batch", batch_mod.build_batch)
    eng.model.forward = timed("forward (eager)", eng.model.forward)
    if eng.decode_graphs is not None:
        eng.decode_graphs.run = timed("forward (graph replay)", eng.decode_graphs.run)
    eng.model.logits = timed("logits", eng.model.logits)
    engine_mod.sample = timed("sample", engine_mod.sample)
    eng.scheduler.update_from_output = timed("update", eng.scheduler.update_from_output)
    eng._outputs = timed("detokenize+outputs", eng._outputs)
    for _ in range(3):
        eng.step()
    phases.clear()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            eng.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) / args.steps * 1e3
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=25)

    def device_ms(events) -> float:  # GPU time per step, µs totals from the profiler
        return sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events) / args.steps / 1e3

    # Kernels' busy time against the step: the rest is host work and gaps between graph nodes.
    kernels = {"all_kernels_ms_per_step": device_ms(averages),
               "lora_kernels_ms_per_step": device_ms([e for e in averages if e.key.startswith("lora_")])}
    result = {"environment": environment(args.commit), "args": vars(args) | {"out": str(args.out)}, "step_ms": step_ms, **kernels,
              "phases_ms_per_step": {k: v / args.steps * 1e3 for k, v in phases.items()}}
    print(json.dumps(result, indent=1))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"profile-{'base' if args.base_only else args.setting}-b{args.batch}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}-kernels.txt").write_text(table)


if __name__ == "__main__":
    main()

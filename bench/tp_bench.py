"""Tensor-parallel engine benchmark (issue 7): S1 / S2 throughput at W = 1, 2, 4 GPUs, LoRA under
each scheme against the base model alone at the same W. One JSON record per run, written after
every run (a run cut short by a timeout keeps the ones before it).

    python -m lorafleet.bench.tp_bench --worlds 1 2 4 --settings S1 S2 --schemes fused slora --n 100 \
        --rate 40 --duration 6 --budget-s 300 --out bench/results/tp

One engine per (W, mode): the base-only engine runs the trace once without adapters, a LoRA
engine runs every setting's trace in turn (adapter numbers offset per setting; run_once starts
each run with no cached adapter). Each engine first serves --warmup seconds of a short trace per
setting, unrecorded, so that no rank JIT-compiles a kernel on the clock (engine_start_s
includes it). W = 1 is the one-process engine (the TP runtime alone with --w1-tp). Every W runs
eagerly, or every W replays decode graphs (--graphs; --w1-graphs: W = 1 only), and every W uses the
same elementwise ops (--elementwise: the fused kernels by default), so the scaling is like for like.
Before each engine and run the script checks its remaining --budget-s against the times measured
so far and skips what would not fit (listed as skipped in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.engine_bench import run_once
from lorafleet.bench.report import environment
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.step_probe import decode_step_ms
from lorafleet.bench.tp_report import write_tp_results
from lorafleet.bench.workload import SETTINGS, generate_trace
from lorafleet.engine.engine import EngineConfig, LLMEngine
from lorafleet.engine.tp.engine_runtime import build_tp_runtime

SETTING_OFFSET = 1_000_000  # adapter numbers of setting i start at i * this (a multiple of every rank count)


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    world: int
    mode: str  # "lora" | "base-only"
    scheme: str  # the TP LoRA scheme ("-" at W = 1 and for base-only)


def plan_engines(worlds: list[int], schemes: list[str]) -> list[EnginePlan]:
    """Most useful first: per W the base bound, then the first scheme; the other schemes last."""
    first = []
    for w in worlds:
        first.append(EnginePlan(w, "base-only", "-"))
        first.append(EnginePlan(w, "lora", "-" if w == 1 else schemes[0]))
    rest = [EnginePlan(w, "lora", s) for s in schemes[1:] for w in worlds if w > 1]
    return first + rest


def offset_trace(trace, setting_index: int):
    return [dataclasses.replace(r, adapter=r.adapter + setting_index * SETTING_OFFSET) for r in trace]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["S1", "S2"])
    p.add_argument("--schemes", nargs="+", choices=["fused", "slora", "replicated_a", "gather_outputs"],
                   default=["fused", "slora"])
    p.add_argument("--n", type=int, default=100, help="adapters in the trace")
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=512, help="input and output lengths drawn in [8, max-len)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of a short trace per engine and setting, not recorded: every rank compiles its "
                        "kernels (and the engine reaches steady state) before the clock starts; 0: none")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--decode-steps-per-prefill", type=int, default=0, help="the same scheduling at every W")
    p.add_argument("--w1-graphs", action="store_true", help="CUDA graphs for W = 1 (not like for like)")
    p.add_argument("--w1-tp", action="store_true",
                   help="W = 1 through the TP runtime (rank 0 alone, NCCL of one) instead of the one-process "
                        "engine: the TP path's own cost on one GPU")
    p.add_argument("--graphs", action="store_true",
                   help="decode CUDA graphs at every W (W > 1: tp_cuda_graphs); pair with --decode-steps-per-prefill 4")
    p.add_argument("--elementwise", choices=["torch", "auto"], default="auto",
                   help="elementwise ops at every W; auto: the fused kernels on CUDA")
    p.add_argument("--probe-batch", type=int, default=64,
                   help="after each run, time decode steps at this fixed batch (bench/step_probe.py); 0: no probe")
    p.add_argument("--probe-adapters", type=int, default=32, help="distinct adapters in the probe's batch")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip engines and runs that would not fit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-pages", type=int, default=0, help="0: from free GPU memory (512 on the CPU)")
    p.add_argument("--out", type=Path, default=Path("bench/results/tp"))
    p.add_argument("--commit", default=None, help="git commit of the code (read from git when omitted)")
    args = p.parse_args(argv)
    shapes = {SETTINGS[s].shape for s in args.settings}
    if len(shapes) != 1:
        p.error(f"settings of one model shape only, got {sorted(shapes)}")
    if args.device == "cuda" and max(args.worlds) > torch.cuda.device_count():
        p.error(f"--worlds needs {max(args.worlds)} GPUs, {torch.cuda.device_count()} visible")
    return args


def _config(args, model_dir: Path, plan: EnginePlan, max_rank: int) -> EngineConfig:
    cuda = args.device == "cuda"
    return EngineConfig(
        model_dir=str(model_dir), device=args.device, random_weights_seed=0, max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens, max_adapter_rank=max_rank,
        num_pages=args.num_pages or (0 if cuda else 512), decode_steps_per_prefill=args.decode_steps_per_prefill,
        cuda_graphs=bool(args.graphs or (args.w1_graphs and plan.world == 1)), tp_cuda_graphs=args.graphs,
        tp_size=plan.world,
        elementwise_ops=args.elementwise,
        tp_lora_scheme=plan.scheme if plan.scheme != "-" else "fused", tp_research_schemes=True,
    )


def _bank(banks: dict, engine: LLMEngine, setting) -> AdapterBank:
    if setting.name not in banks:
        banks[setting.name] = AdapterBank(engine.spec, setting.ranks, setting.modules, engine.device)
    return banks[setting.name]


def rec_tag(plan: EnginePlan, setting) -> str:
    return f"W{plan.world}-{plan.mode}-{plan.scheme}-{setting.name if setting else 'base'}"


def _log(msg: str) -> None:
    print(f"[tp_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t_start = time.monotonic()
    settings = [SETTINGS[s] for s in args.settings]
    model_dir = make_model_folder(settings[0].shape, Path("/tmp/lorafleet-bench") / settings[0].shape)
    max_rank = max(r for s in settings for r in s.ranks)
    trace = generate_trace(args.n, args.alpha, args.rate, args.cv, args.duration,
                           input_range=(8, args.max_len), output_range=(8, args.max_len))
    records, skipped, est_start, est_run = [], [], 0.0, 0.0
    banks: dict[str, AdapterBank] = {}  # host copies, made once and shared by every engine
    payload_args = {**vars(args), "env": environment(args.commit)}

    def left() -> float:
        return args.budget_s - (time.monotonic() - t_start)

    for plan in plan_engines(args.worlds, args.schemes):
        runs = [(i, s) for i, s in enumerate(settings)] if plan.mode == "lora" else [(0, None)]
        if left() < est_start + est_run:
            skipped.append({**dataclasses.asdict(plan), "why": f"budget ({left():.0f} s left)"})
            _log(f"skip {plan}: {left():.0f} s left")
            continue
        _log(f"start {plan}")
        t = time.monotonic()
        engine = LLMEngine(_config(args, model_dir, plan, max_rank), build_tp_runtime if args.w1_tp else None)
        if args.warmup > 0:
            warm = generate_trace(4, args.alpha, args.rate, args.cv, args.warmup, input_range=(8, 64),
                                  output_range=(8, 24), seed=7)
            for index, setting in runs:
                bank = None if setting is None else _bank(banks, engine, setting)
                run_once(engine, bank, offset_trace(warm, index), engine.spec.vocab_size, tag=f"warm{index}")
        start_s = time.monotonic() - t
        est_start = max(est_start, start_s)
        _log(f"engine up and warm in {start_s:.1f} s ({engine.pool.shape[1]} pages)")
        try:
            for index, setting in runs:
                if records and left() < est_run:
                    skipped.append({**dataclasses.asdict(plan), "setting": setting and setting.name, "why": "budget"})
                    continue
                bank = None if setting is None else _bank(banks, engine, setting)
                t = time.monotonic()
                result = run_once(engine, bank, offset_trace(trace, index), engine.spec.vocab_size,
                                  tag=rec_tag(plan, setting))
                wall = time.monotonic() - t
                probe = {}
                if args.probe_batch > 0:  # the decode step at a fixed batch, the same engine and adapters
                    probe = decode_step_ms(engine, bank, batch=args.probe_batch, adapters=args.probe_adapters,
                                           tag=f"probe-{rec_tag(plan, setting)}")
                est_run = max(est_run, time.monotonic() - t)
                rec = {"setting": setting.name if setting else "base", "mode": plan.mode, "world": plan.world,
                       "runtime": "tp" if plan.world > 1 or args.w1_tp else "one-process",
                       "scheme": plan.scheme, "n": args.n if setting else 0, "rate": args.rate,
                       "duration": args.duration, "ranks": list(setting.ranks) if setting else [],
                       "engine_start_s": start_s, "wall_s": wall, **result,
                       **{f"probe_{k}": v for k, v in probe.items()}}
                records.append(rec)
                _log(f"W={plan.world} {plan.mode} {plan.scheme} {rec['setting']}: {rec['throughput_req_s']:.2f} req/s, "
                     f"{rec['throughput_tok_s']:.0f} tok/s, {rec['steps']} steps in {wall:.1f} s"
                     + (f"; decode step {probe['step_ms_p50']:.2f} ms at batch {probe['batch']}" if probe else ""))
                write_tp_results(args.out, records, skipped, payload_args)
        finally:
            engine.close()
            del engine
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    write_tp_results(args.out, records, skipped, payload_args)
    _log(f"done: {len(records)} runs, {len(skipped)} skipped, {time.monotonic() - t_start:.0f} s")
    print(json.dumps([{k: r[k] for k in ("world", "mode", "scheme", "setting", "throughput_req_s")} for r in records]),
          flush=True)
    return records


if __name__ == "__main__":
    main()

"""Host work per decode step, measured on the CPU: what the engine's own Python costs around the
forward (prefetch, schedule, build_batch, output processing, update), for a batch of decodes over
many adapters, and how much of it a GPU would wait for. On a GPU host work costs time only where
the device has no step queued meanwhile: with one step at a time (async_scheduling off) that is
update + prefetch + schedule + build_batch of every step; with asynchronous scheduling the next
step is launched before the previous one is read back, so none of it (LLMEngine.device_idle_seconds
counts it, the "exposed" column). Both modes run side by side, alternating, in one run.

    python -m lorafleet.bench.host_step --batch 256 --adapters 200 --steps 40 --repeat 2

Model: the "host" shape (bench/shapes.py): 32 layers like Llama-7B (per-layer host loops cost
what they cost there) but hidden size 64, random weights, so the forward ("launch" on the CPU)
is short and not the subject. Adapters: rank 8 on q/k/v/o (S1's), random (bench/adapters.py).
Each of `batch` requests takes adapter i % adapters; once all are decoding (step_probe's
decoding_batch), `steps` decode steps are timed phase by phase (LLMEngine.step_seconds), per mode
and round. Results: bench/results/host-step/<commit>/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.report import environment
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.step_probe import decoding_batch
from lorafleet.engine.engine import STEP_PHASES, EngineConfig, LLMEngine

HOST_PHASES = ("prefetch", "schedule", "build_batch", "outputs", "update")  # "launch" is the forward here


MODES = {"sync": False, "async": True}  # async_scheduling


def measure(engine: LLMEngine, bank: AdapterBank, batch: int, adapters: int, steps: int) -> dict:
    per_step: dict[str, list[float]] = {phase: [] for phase in (*STEP_PHASES, "exposed")}
    with decoding_batch(engine, bank, batch, adapters, prompt_len=32, steps=steps, tag="h"):
        for _ in range(steps):
            before, idle = dict(engine.step_seconds), engine.device_idle_seconds
            engine.step()
            for phase in STEP_PHASES:
                per_step[phase].append((engine.step_seconds[phase] - before[phase]) * 1000)
            per_step["exposed"].append((engine.device_idle_seconds - idle) * 1000)
    host = [sum(per_step[p][k] for p in HOST_PHASES) for k in range(steps)]
    return {"batch": batch, "adapters": adapters, "steps": steps,
            "host_ms_p50": float(np.median(host)), "host_ms_p90": float(np.percentile(host, 90)),
            **{f"{phase}_ms_p50": float(np.median(values)) for phase, values in per_step.items()}}


COLS = ["host_ms_p50", "host_ms_p90", "exposed_ms_p50", *[f"{p}_ms_p50" for p in STEP_PHASES]]


def write(out: Path, records: list[dict], args: argparse.Namespace) -> None:
    env = environment(args.commit)
    folder = out / env["commit"][:7]
    folder.mkdir(parents=True, exist_ok=True)
    medians = {mode: {c: float(np.median([r[c] for r in records if r["mode"] == mode])) for c in COLS}
               for mode in args.modes}
    (folder / "host-step.json").write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(out)},
                                                        "records": records, "medians": medians}, indent=1))
    r0 = records[0]
    lines = ["# Host work per decode step (CPU)", "", f"commit `{env['commit']}`, {env['gpu']}, torch {env['torch']}, "
             f"{env['date']}", "", f"command: `{env['command']}`", "",
             f"{r0['batch']} decodes over {r0['adapters']} adapters, {r0['steps']} steps timed per mode and round, "
             f"{args.repeat} rounds alternating the modes (medians over rounds); host = {' + '.join(HOST_PHASES)} "
             "(launch is the CPU forward, not host work on a GPU); exposed = host time with no step queued, "
             "which a GPU would wait for", "",
             "| mode | " + " | ".join(COLS) + " |", "|---|" + "---|" * len(COLS)]
    lines += [f"| {mode} | " + " | ".join(f"{m[c]:.2f}" for c in COLS) + " |" for mode, m in medians.items()]
    if {"sync", "async"} <= medians.keys():
        s_, a_ = medians["sync"], medians["async"]
        lines += ["", f"async / sync: host work {a_['host_ms_p50'] / s_['host_ms_p50']:.2f}x, exposed host work "
                  f"{a_['exposed_ms_p50']:.2f} ms against {s_['exposed_ms_p50']:.2f} ms per step"]
    (folder / "host-step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--repeat", type=int, default=2, help="rounds; each runs every mode once, in alternating order")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/host-step"))
    args = p.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model_folder("host", Path(tmp) / "model")
        engines = {mode: LLMEngine(EngineConfig(
            model_dir=str(model), device="cpu", dtype="float32", random_weights_seed=0, max_num_seqs=args.batch,
            max_batched_tokens=max(2048, args.batch), num_pages=args.batch * 8 + args.adapters * 64,
            async_scheduling=MODES[mode])) for mode in args.modes}
        bank = AdapterBank(next(iter(engines.values())).spec, (8,), ("q_proj", "k_proj", "v_proj", "o_proj"),
                           torch.device("cpu"), dtype=torch.float32)
        for r in range(args.repeat):
            for mode in args.modes if r % 2 == 0 else args.modes[::-1]:
                started = time.perf_counter()
                record = measure(engines[mode], bank, args.batch, args.adapters, args.steps)
                records.append({"mode": mode, "round": r, **record, "wall_s": time.perf_counter() - started})
                print(f"round {r} {mode}: host {record['host_ms_p50']:.2f} ms, exposed {record['exposed_ms_p50']:.2f} ms",
                      flush=True)
        for engine in engines.values():
            engine.close()
    write(args.out, records, args)


if __name__ == "__main__":
    main()

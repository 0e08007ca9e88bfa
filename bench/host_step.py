"""Host work per decode step, measured on the CPU: what the engine's own Python costs around the
forward (prefetch, schedule, build_batch, output processing, update), for a batch of decodes over
many adapters. On a GPU that work runs while the device idles unless it overlaps the previous
step; this measures it without a GPU, so a change that removes host work is checked here.

    python -m lorafleet.bench.host_step --batch 256 --adapters 200 --steps 40

Model: the "host" shape (bench/shapes.py): 32 layers like Llama-7B (per-layer host loops cost
what they cost there) but hidden size 64, random weights, so the forward ("launch" on the CPU)
is short and not the subject. Adapters: rank 8 on q/k/v/o (S1's), random (bench/adapters.py).
Each of `batch` requests takes adapter i % adapters; once all are decoding (step_probe's
decoding_batch), `steps` decode steps are timed phase by phase (LLMEngine.step_seconds). Results: bench/results/host-step/<commit>/.
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


def measure(engine: LLMEngine, bank: AdapterBank, batch: int, adapters: int, steps: int) -> dict:
    per_step: dict[str, list[float]] = {phase: [] for phase in STEP_PHASES}
    with decoding_batch(engine, bank, batch, adapters, prompt_len=32, steps=steps, tag="h"):
        for _ in range(steps):
            before = dict(engine.step_seconds)
            engine.step()
            for phase in STEP_PHASES:
                per_step[phase].append((engine.step_seconds[phase] - before[phase]) * 1000)
    host = [sum(per_step[p][k] for p in HOST_PHASES) for k in range(steps)]
    return {"batch": batch, "adapters": adapters, "steps": steps,
            "host_ms_p50": float(np.median(host)), "host_ms_p90": float(np.percentile(host, 90)),
            **{f"{phase}_ms_p50": float(np.median(per_step[phase])) for phase in STEP_PHASES}}


def write(out: Path, record: dict, args: argparse.Namespace) -> None:
    env = environment(args.commit)
    folder = out / env["commit"][:7]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "host-step.json").write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(out)},
                                                        "record": record}, indent=1))
    cols = ["host_ms_p50", "host_ms_p90", *[f"{p}_ms_p50" for p in STEP_PHASES]]
    lines = ["# Host work per decode step (CPU)", "", f"commit `{env['commit']}`, {env['gpu']}, torch {env['torch']}, "
             f"{env['date']}", "", f"command: `{env['command']}`", "",
             f"{record['batch']} decodes over {record['adapters']} adapters, {record['steps']} steps timed; "
             f"host = {' + '.join(HOST_PHASES)} (launch is the CPU forward, not host work on a GPU)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             "| " + " | ".join(f"{record[c]:.2f}" for c in cols) + " |"]
    (folder / "host-step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/host-step"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model_folder("host", Path(tmp) / "model")
        engine = LLMEngine(EngineConfig(model_dir=str(model), device="cpu", dtype="float32", random_weights_seed=0,
                                        max_num_seqs=args.batch, max_batched_tokens=max(2048, args.batch),
                                        num_pages=args.batch * 8 + args.adapters * 64))
        bank = AdapterBank(engine.spec, (8,), ("q_proj", "k_proj", "v_proj", "o_proj"), torch.device("cpu"),
                           dtype=torch.float32)
        started = time.perf_counter()
        record = measure(engine, bank, args.batch, args.adapters, args.steps)
        record["wall_s"] = time.perf_counter() - started
        engine.close()
    write(args.out, record, args)


if __name__ == "__main__":
    main()

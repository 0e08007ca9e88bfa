"""Decode-step time of two source trees side by side: did a change leave the engine's step as fast?

Each tree is an installed copy of lorafleet (PYTHONPATH folders, e.g. from `pip install --target`,
plus a folder of the dependencies the device lacks); each child reports which copy it imported.
Every round starts one fresh process per tree, in alternating order, and each process builds the
engine (random weights of the setting's model shape, decode graphs where the device has them) and
times decode steps at a fixed batch with bench/step_probe.py, base-only and with the setting's
adapters. The report gives each tree's median over rounds and the ratio of each tree to the first.

    python -m lorafleet.bench.step_ab --tree before=/tmp/site-old --tree after=/tmp/site \\
        --setting S1 --batch 64 --adapters 32 --rounds 2 --commit <sha> --out bench/results/step-ab/<sha>

The child runs only APIs both trees have (LLMEngine, EngineConfig, step_probe.decode_step_ms,
AdapterBank, shapes.make_model_folder, workload.SETTINGS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from lorafleet.bench.report import environment

CHILD = """
import json, sys
from pathlib import Path
import torch
import lorafleet.engine
from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.step_probe import decode_step_ms
from lorafleet.bench.workload import SETTINGS
from lorafleet.engine.engine import EngineConfig, LLMEngine
a = json.loads(sys.argv[1])
setting = SETTINGS[a["setting"]]
folder = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
cuda = torch.cuda.is_available()
cfg = EngineConfig(model_dir=str(folder), device="cuda" if cuda else "cpu", random_weights_seed=0,
                   max_num_seqs=max(a["batch"], 8), max_batched_tokens=4096, max_adapter_rank=max(setting.ranks),
                   num_pages=0 if cuda else 2048, cuda_graphs=cuda)
engine = LLMEngine(cfg)
bank = AdapterBank(engine.spec, setting.ranks, setting.modules, engine.device)
out = {"code": lorafleet.engine.__file__}
for mode in ("base", "lora"):
    decode_step_ms(engine, None if mode == "base" else bank, a["batch"], a["adapters"], steps=8, tag="warm-" + mode)
    out[mode] = decode_step_ms(engine, None if mode == "base" else bank, a["batch"], a["adapters"],
                               steps=a["steps"], tag=mode)
print("RESULT " + json.dumps(out), flush=True)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=SITE",
                   help="a name and an installed lorafleet's folder (PYTHONPATH); the first is the baseline")
    p.add_argument("--setting", default="S1", help="workload setting whose model shape and adapters to use")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters in the batch")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per process and mode")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per tree (alternating order)")
    p.add_argument("--timeout-s", type=float, default=300, help="limit for one child process")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if any("=" not in t for t in args.tree) or len(args.tree) < 2:
        p.error("give two or more --tree NAME=SITE")
    return args


def run_child(site: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": site}
    payload = json.dumps({k: getattr(args, k) for k in ("setting", "batch", "adapters", "steps")})
    proc = subprocess.run([sys.executable, "-c", CHILD, payload], env=env, cwd="/", capture_output=True, text=True,
                          timeout=args.timeout_s)
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        raise RuntimeError(f"child for {site} failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    trees = [tuple(t.split("=", 1)) for t in args.tree]
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    args.out.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]  # alternate who goes first (clocks, caches)
        for name, site in order:
            runs[name].append(run_child(site, args))
            lora = runs[name][-1]["lora"]["step_ms_p50"]
            print(f"round {r} {name}: base {runs[name][-1]['base']['step_ms_p50']:.3f} ms, lora {lora:.3f} ms",
                  flush=True)
            # what is measured so far survives a run cut short by its time limit
            (args.out / "step_ab.partial.json").write_text(json.dumps(runs, indent=1))
    medians = {name: {mode: statistics.median(run[mode]["step_ms_p50"] for run in rs) for mode in ("base", "lora")}
               for name, rs in runs.items()}
    first = trees[0][0]
    ratios = {name: {mode: m[mode] / medians[first][mode] for mode in m} for name, m in medians.items()}
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "env": environment(args.commit),
              "runs": runs, "median_step_ms": medians, "ratio_to_" + first: ratios}
    (args.out / "step_ab.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Decode step, {args.setting} shapes, batch {args.batch} ({args.adapters} adapters), "
             f"{args.rounds} processes per tree", "", f"Command: `python -m lorafleet.bench.step_ab {' '.join(argv or sys.argv[1:])}`",
             "", "| tree | base-only step ms (median p50) | LoRA step ms | base ratio | LoRA ratio |", "|---|---|---|---|---|"]
    for name, m in medians.items():
        lines.append(f"| {name} | {m['base']:.3f} | {m['lora']:.3f} | {ratios[name]['base']:.3f} | "
                     f"{ratios[name]['lora']:.3f} |")
    (args.out / "step_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()

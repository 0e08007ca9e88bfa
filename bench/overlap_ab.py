"""LoRA shrink beside the base matmul or after it, in one process on one batch (decode graphs).

Engine-to-engine noise on an H200 is as large as the effect (the base-only probe step of two
engines of the same code: 7.60 and 6.94 ms, 7cf1a77), so this A/B holds everything else still:
one engine, one batch of `batch` decode requests over `adapters` adapters of a setting, and two
sets of decode graphs over the same weights, pool and adapter tables, the engine's own
(`decode_lora_overlap`, side stream) and a second one captured without the side stream. Rounds
alternate the two (`steps` engine steps each); the median step of each, and of a base-only batch
on the engine's graphs (the LoRA cost's denominator), go to `overlap-ab.{json,md}`.

    python -m bench.overlap_ab --settings S1 S2 --out bench/results/tp/COMMIT/overlap-ab
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.adapters import AdapterBank
from bench.report import environment
from bench.shapes import make_model_folder
from bench.step_probe import abort, admit, timed_steps
from bench.workload import SETTINGS
from services.engine.cuda_graphs import DecodeGraphs
from services.engine.engine import EngineConfig, LLMEngine


def run(args) -> dict:
    settings = [SETTINGS[s] for s in args.settings]
    model_dir = make_model_folder(settings[0].shape, Path("/tmp/lorafleet-bench") / settings[0].shape)
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), random_weights_seed=0, max_num_seqs=args.batch,
                                    max_batched_tokens=4096, max_adapter_rank=max(max(s.ranks) for s in settings)))
    side = engine.decode_graphs
    assert side is not None and side.model.lora_stream is not None, "needs decode graphs with the side stream"
    serial = DecodeGraphs(engine.spec, side.model.w, side.pool, side.tables, side.max_batch, side.max_rank,
                          side.block_size, lora_overlap=False)
    variants = {"beside (side stream)": side, "after (one stream)": serial}
    rows = []
    admit(engine, None, args.batch, 1, args.prompt_len, args.rounds * args.steps, "base")
    times = timed_steps(engine, args.rounds * args.steps)
    abort(engine, args.batch, "base")
    rows.append({"setting": "base", "variant": "-", "step_ms_p50": 1e3 * statistics.median(times)})
    for setting in settings:
        bank = AdapterBank(engine.spec, setting.ranks, setting.modules, engine.device)
        admit(engine, bank, args.batch, args.adapters, args.prompt_len, 2 * args.rounds * args.steps, setting.name)
        per = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, graphs in variants.items():
                engine.decode_graphs = graphs
                per[name] += timed_steps(engine, args.steps)
        engine.decode_graphs = side
        abort(engine, args.batch, setting.name)
        for name, times in per.items():
            rows.append({"setting": setting.name, "variant": name, "step_ms_p50": 1e3 * statistics.median(times)})
    for row in rows:
        print(json.dumps(row), flush=True)
    result = {"environment": environment(args.commit), "batch": args.batch, "adapters": args.adapters,
              "prompt_len": args.prompt_len, "rounds": args.rounds, "steps": args.steps, "rows": rows}
    _write(args.out, result)
    return result


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlap-ab.json").write_text(json.dumps(result, indent=1))
    env, rows = result["environment"], result["rows"]
    base = next(r["step_ms_p50"] for r in rows if r["setting"] == "base")
    lines = ["# LoRA shrink beside the base matmul or after it (decode graphs, one engine, one batch)", "",
             f"commit `{env['commit']}`, {env['gpu']}; {result['batch']} decode requests over {result['adapters']} "
             f"adapters, prompts of {result['prompt_len']}; {result['rounds']} alternating rounds of {result['steps']} steps",
             "", f"command: `{env['command']}`", "",
             "| setting | shrink | decode step p50 (ms) | LoRA cost (1 - base / step) |", "|---|---|---|---|"]
    for r in rows:
        cost = "-" if r["setting"] == "base" else f"{100 * (1 - base / r['step_ms_p50']):.1f}%"
        lines.append(f"| {r['setting']} | {r['variant']} | {r['step_ms_p50']:.2f} | {cost} |")
    (out / "overlap-ab.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["S1", "S2"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("bench/results/overlap-ab"))
    p.add_argument("--commit", default=None)
    run(p.parse_args())

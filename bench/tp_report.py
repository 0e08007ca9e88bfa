"""Results of bench/tp_bench.py: tp-engine.json (every record, skipped runs, environment),
tp-engine.md (all runs, then scaling against W = 1 and the LoRA cost against base-only at the
same W), tp-engine.png (throughput against W per setting, LoRA schemes and base-only)."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [("world", "{}"), ("runtime", "{}"), ("setting", "{}"), ("mode", "{}"), ("scheme", "{}"), ("n", "{}"),
           ("throughput_req_s", "{:.2f}"), ("throughput_tok_s", "{:.0f}"), ("ttft_p50_s", "{:.2f}"),
           ("ttft_p99_s", "{:.2f}"), ("steps", "{}"), ("graph_steps", "{}"), ("probe_step_ms_p50", "{:.2f}"), ("adapter_loads", "{}"), ("preemptions", "{}"),
           ("engine_start_s", "{:.1f}"), ("wall_s", "{:.1f}")]


def _key(r: dict) -> tuple:
    return r["setting"], r["mode"], r["scheme"]


def scaling_rows(records: list[dict]) -> list[dict]:
    """Per (setting, scheme) and W: req/s, speed-up over W = 1 (its LoRA engine, or base-only for the
    base rows) and the LoRA cost against base-only at the same W: 1 - lora / base."""
    base = {r["world"]: r["throughput_req_s"] for r in records if r["mode"] == "base-only"}
    base_step = {r["world"]: r.get("probe_step_ms_p50") for r in records if r["mode"] == "base-only"}
    w1 = {r["setting"]: r["throughput_req_s"] for r in records if r["world"] == 1}
    rows = []
    for r in records:
        one = w1.get(r["setting"])
        b, step, b_step = base.get(r["world"]), r.get("probe_step_ms_p50"), base_step.get(r["world"])
        rows.append({
            "setting": r["setting"], "scheme": r["scheme"], "world": r["world"], "req_s": r["throughput_req_s"],
            "speedup_vs_w1": r["throughput_req_s"] / one if one else None,
            "lora_cost_vs_base": (1 - r["throughput_req_s"] / b) if (b and r["mode"] == "lora") else None,
            # the probe's decode step at a fixed batch: the same ratio in step rates (1 - base / lora time)
            "step_ms": step,
            "step_lora_cost": (1 - b_step / step) if (step and b_step and r["mode"] == "lora") else None,
        })
    return sorted(rows, key=lambda x: (x["setting"], x["scheme"], x["world"]))


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def write_tp_results(out: Path, records: list[dict], skipped: list[dict], args: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = args.get("env", {})
    clean_args = {k: str(v) for k, v in args.items() if k != "env"}
    payload = {"environment": env, "args": clean_args, "records": records, "skipped": skipped,
               "scaling": scaling_rows(records)}
    (out / "tp-engine.json").write_text(json.dumps(payload, indent=1))
    lines = ["# Tensor-parallel engine: S1 / S2 throughput against W", "",
             f"commit `{env.get('commit', '?')}`, {env.get('gpu', '?')}, torch {env.get('torch', '?')}, "
             f"{env.get('date', '?')}", "", f"command: `{env.get('command', '?')}`", "",
             "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        lines.append("| " + " | ".join(fmt.format(r[c]) if c in r else "-" for c, fmt in COLUMNS) + " |")
    lines += ["", "## Scaling (speed-up over W = 1) and LoRA cost (1 - LoRA / base-only at the same W; probe: a decode step at a fixed batch)", "",
              "| setting | scheme | W | req/s | speed-up vs W=1 | LoRA cost vs base | decode step ms (probe) "
              "| step LoRA cost |", "|---|---|---|---|---|---|---|---|"]
    for row in scaling_rows(records):
        lines.append(f"| {row['setting']} | {row['scheme']} | {row['world']} | {row['req_s']:.2f} | "
                     f"{_fmt(row['speedup_vs_w1'], '{:.2f}x')} | {_fmt(row['lora_cost_vs_base'], '{:.1%}')} | "
                     f"{_fmt(row['step_ms'], '{:.2f}')} | {_fmt(row['step_lora_cost'], '{:.1%}')} |")
    if skipped:
        lines += ["", "Skipped (time budget): " + "; ".join(
            f"W={s['world']} {s['mode']} {s['scheme']} {s.get('setting') or ''} ({s['why']})" for s in skipped)]
    (out / "tp-engine.md").write_text("\n".join(lines) + "\n")
    _plot(out / "tp-engine.png", records)


def _plot(path: Path, records: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    settings = sorted({r["setting"] for r in records if r["mode"] == "lora"})
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    base = sorted((r["world"], r["throughput_req_s"]) for r in records if r["mode"] == "base-only")
    for ax, setting in zip(axes[0], settings):
        if base:
            ax.plot(*zip(*base), "k--o", label="base-only")
        schemes = sorted({r["scheme"] for r in records if r["setting"] == setting and r["world"] > 1})
        w1 = [r for r in records if r["setting"] == setting and r["world"] == 1]
        for scheme in schemes:
            pts = sorted((r["world"], r["throughput_req_s"]) for r in records
                         if r["setting"] == setting and (r["scheme"] == scheme or r["world"] == 1) and r["mode"] == "lora")
            ax.plot(*zip(*pts), "o-", label=f"LoRA {scheme}")
        if w1 and not schemes:
            ax.plot([w1[0]["world"]], [w1[0]["throughput_req_s"]], "o", label="LoRA")
        ax.set_xticks(sorted({r["world"] for r in records}))
        ax.set_xlabel("GPUs (W)")
        ax.set_ylabel("requests / s")
        ax.set_title(setting)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Benchmark results on disk: JSON (with commit, GPU and command), a markdown table, a PNG plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

COLUMNS = [("setting", "{}"), ("mode", "{}"), ("n", "{}"), ("throughput_req_s", "{:.2f}"), ("throughput_tok_s", "{:.0f}"),
           ("ttft_mean_s", "{:.2f}"), ("ttft_p50_s", "{:.2f}"), ("ttft_p90_s", "{:.2f}"), ("ttft_p99_s", "{:.2f}"),
           ("slo_6s", "{:.2%}"), ("peak_kv_gb", "{:.1f}"), ("peak_adapter_gb", "{:.2f}"),
           ("adapter_loads", "{}"), ("adapter_evictions", "{}"), ("preemptions", "{}"), ("wall_s", "{:.0f}")]


ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(commit: str | None = None, module: str | None = None) -> dict:
    """What a result was measured on and with: commit, command (`python -m module args` when the
    benchmark names its module), machine, CPUs, Python, GPU, torch, date."""
    command = [f"python -m {module}", *sys.argv[1:]] if module else [Path(sys.executable).name, *sys.argv]
    return {
        "commit": commit or _commit(), "command": " ".join(command),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(out: Path, name: str, records: list[dict], args: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.get("commit"))
    payload = {"environment": env, "args": {k: str(v) for k, v in args.items()}, "records": records}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# {name}", "", f"commit `{env['commit']}`, {env['gpu']}, torch {env['torch']}, {env['date']}", "",
             f"command: `{env['command']}`", "", "| " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in records:
        lines.append("| " + " | ".join(fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in COLUMNS) + " |")
        if r.get("fits") is False:
            lines[-1] += f" does not fit: {r['reason']}"
        if "error" in r:
            lines[-1] += f" failed: {r['error'][:200]}"
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_records(out / f"{name}.png", name, records)


def plot_records(path: Path, name: str, records: list[dict]) -> None:
    """Throughput against n: the measured runs as lines, base-only as a level, the roofline bound."""
    plt = pyplot()
    if plt is None:
        return
    runs = [r for r in records if "throughput_req_s" in r]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("lora", "o-"), ("e2e", "s-"), ("merged", "^"), ("hf-peft", "v"), ("roofline", "k:")):
        pts = sorted((r["n"], r["throughput_req_s"]) for r in runs if r["mode"] == mode and r["n"])
        if pts:
            ax.plot(*zip(*pts), style, label=mode)
    for r in runs:
        if r["mode"] in ("base-only", "roofline-base"):
            ax.axhline(r["throughput_req_s"], ls="--" if r["mode"] == "base-only" else ":", color="gray", label=r["mode"])
    ax.set_xscale("log")
    ax.set_xlabel("adapters (n)")
    ax.set_ylabel("requests / s")
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed (the GPU
    machine may lack it: `python -m lorafleet.bench.summary` redraws every plot from the JSON)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt

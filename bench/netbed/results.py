"""The affinity bench's record: JSON (commit, machine, command, setup, rows), a markdown table with
the affinity / hash ratios, and a PNG of hit rate and throughput per popularity."""

from __future__ import annotations

import json
from pathlib import Path

from lorafleet.bench.report import environment, pyplot

RESULTS = Path(__file__).resolve().parent.parent / "results" / "netbed-affinity"


def markdown(results: dict, env: dict) -> str:
    s = results["setup"]
    lines = ["# Adapter affinity across hosts (multi-host bed)", "",
             f"commit `{env['commit']}`, {env['machine']}, {env['cpu_count']} CPUs, {env['date']}", "",
             f"command: `{env['command']}`", "",
             (f"{s['engines']} CPU engines on their own hosts (network namespaces), {s['partitions']} work partitions, "
             f"{s['adapters']} adapters, {s['adapter_slots']} adapter slots per engine; Poisson arrivals at "
             f"{results['rate_rps']:.2f} req/s = {s['load']:.0%} of the measured capacity "
             f"({results['capacity_rps']:.2f} req/s: a burst of {s['burst']} under hashing) for {s['duration_s']:.0f} s; "
             f"{s['input_range']} prompt and {s['output_range']} output tokens. alpha: popularity exponent "
             "(1 uniform, smaller: more skewed). A fresh bed (empty caches) for every row."), "",
             ("| alpha | policy | requests | hit rate | loads / request | engine-adapter pairs | tokens/s | "
              "saturated tokens/s | e2e p50 / p99 s | TTFT p50 / p99 s |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['alpha']} | {r['policy']} | {r['requests']} | {r['hit_rate']:.1%} | "
                     f"{r['loads_per_request']:.2f} | {r['engine_adapter_pairs']} | {r['tokens_per_s']:.0f} | "
                     f"{r['saturated_tokens_per_s']:.0f} | "
                     f"{r['e2e_p50_s']:.2f} / {r['e2e_p99_s']:.2f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} |")
    lines += ["", "Affinity over hashing, same trace:", "",
              "| alpha | loads / request | saturated tokens/s | e2e p99 | TTFT p99 |", "|---|---|---|---|---|"]
    for alpha in s["alphas"]:
        by = {r["policy"]: r for r in results["rows"] if r["alpha"] == alpha}
        if {"affinity", "hash"} <= by.keys():
            a, h = by["affinity"], by["hash"]
            lines.append(f"| {alpha} | {a['loads_per_request'] / max(h['loads_per_request'], 1e-9):.2f}x | "
                         f"{a['saturated_tokens_per_s'] / h['saturated_tokens_per_s']:.2f}x | "
                         f"{a['e2e_p99_s'] / h['e2e_p99_s']:.2f}x | {a['ttft_p99_s'] / h['ttft_p99_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = results["rows"]
    alphas = results["setup"]["alphas"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "hit_rate", "hit rate"), (axes[1], "saturated_tokens_per_s", "saturated tokens / s")):
        for offset, policy in ((-0.2, "affinity"), (0.2, "hash")):
            values = [next((r[key] for r in rows if r["alpha"] == a and r["policy"] == policy), 0) for a in alphas]
            ax.bar([i + offset for i in range(len(alphas))], values, width=0.4, label=policy)
        ax.set_xticks(range(len(alphas)), [f"alpha {a}" for a in alphas])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("adapter affinity vs hashing on the multi-host bed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict, out: Path | None = None) -> str:
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    env = environment(module="lorafleet.bench.netbed.affinity_bench")
    (out / "affinity.json").write_text(json.dumps({"environment": env, **results}, indent=1) + "\n")
    return render(out)


def render(out: Path) -> str:
    """affinity.md and affinity.png from `out`/affinity.json (again: `--replot`)."""
    recorded = json.loads((out / "affinity.json").read_text())
    env, results = recorded.pop("environment"), recorded
    text = markdown(results, env)
    (out / "affinity.md").write_text(text)
    plot(results, out / "affinity.png")
    return text

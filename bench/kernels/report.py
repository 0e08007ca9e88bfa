"""Markdown tables and a plot from the benchmark rows (also usable on a saved kernels.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BW_TARGET = 70.0  # % of measured copy bandwidth, decode kernels
PREFILL_TARGET = 1.5  # at most this many times a dense matmul of the same FLOPs


def _get(row, key):
    return row[key] if isinstance(row, dict) else getattr(row, key)


def _index(rows):
    out = {}
    for r in rows:
        cfg = _get(r, "config")
        out[(_get(r, "bench"), tuple(sorted(cfg.items())), _get(r, "impl"))] = r
    return out


def _ratio(index, bench, cfg, impl, ms):
    other = index.get((bench, tuple(sorted(cfg.items())), impl))
    return f"{_get(other, 'ms') / ms:.1f}x" if other else "-"


def _eager(index, bench, cfg) -> str:
    other = index.get((bench, tuple(sorted(cfg.items())), "triton_eager"))
    return f"{_get(other, 'ms') * 1e3:.1f}" if other else "-"


def summary_markdown(meta: dict, rows) -> str:
    idx = _index(rows)
    c = meta["ceilings"]
    lines = [
        "# Kernel microbenchmarks",
        "",
        f"GPU {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, commit `{meta['commit']}`, {meta['date']}.",
        f"Command: `{meta['command']}`.",
        f"Measured ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 matmul {c['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s.",
        "Times: median of triton.testing.do_bench with a cold L2 (µs), kernels and capturable baselines as CUDA-graph replays",
        "(GPU time, as the engine's captured decode step runs them); `eager µs`: the plain Python call, host launch path included.",
        "`vs bmm` / `vs ref`: how many times faster than S-LoRA's padded-rank bmm baseline / the torch reference (eager).",
        "%BW: bytes the op must move (each input once, each output once, each distinct adapter's matrices once) over time,",
        "against the measured copy ceiling.",
        "",
        "## LoRA decode (Llama-7B layer, bf16)",
        "",
        "| rank | tokens | adapters | op | µs | eager µs | MB moved | GB/s | %BW | target 70% | vs bmm | vs ref |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if _get(r, "bench") != "lora_decode" or _get(r, "impl") != "triton":
            continue
        cfg, ms, ex = _get(r, "config"), _get(r, "ms"), _get(r, "extra")
        ok = "met" if ex["pct_bandwidth"] >= BW_TARGET else f"miss ({ex['pct_bandwidth'] / BW_TARGET:.2f} of it)"
        lines.append(
            f"| {cfg['rank']} | {cfg['tokens']} | {cfg['adapters']} | {cfg['op']} | {ms * 1e3:.1f} | {_eager(idx, 'lora_decode', cfg)} | "
            f"{_get(r, 'bytes') / 1e6:.1f} | {ex['bytes_per_s'] / 1e9:.0f} | "
            f"{ex['pct_bandwidth']:.0f} | {ok} | {_ratio(idx, 'lora_decode', cfg, 'bmm_padded', ms)} | {_ratio(idx, 'lora_decode', cfg, 'torch_ref', ms)} |"
        )
    lines += [
        "",
        "## LoRA prefill (q/k/v fused, bf16)",
        "",
        "| rank | segments | seg_len | op | µs | eager µs | TFLOP/s | GB/s | dense matmul µs | / dense (target <= 1.5) | vs ref |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if _get(r, "bench") != "lora_prefill" or _get(r, "impl") != "triton":
            continue
        cfg, ms, ex = _get(r, "config"), _get(r, "ms"), _get(r, "extra")
        dense = idx.get(("lora_prefill", tuple(sorted(cfg.items())), "dense_matmul"))
        dense_ms = _get(dense, "ms") if dense else float("nan")
        lines.append(
            f"| {cfg['rank']} | {cfg['segments']} | {cfg['seg_len']} | {cfg['op']} | {ms * 1e3:.1f} | {_eager(idx, 'lora_prefill', cfg)} | "
            f"{ex['flop_per_s'] / 1e12:.1f} | {ex['bytes_per_s'] / 1e9:.0f} | "
            f"{dense_ms * 1e3:.1f} | {ms / dense_ms:.2f} | {_ratio(idx, 'lora_prefill', cfg, 'torch_ref', ms)} |"
        )
    lines += ["", "## Paged decode attention (bf16, block 16)", "",
              "| heads | batch | context | µs | eager µs | MB moved | GB/s | %BW | target 70% | vs ref |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in rows:
        if _get(r, "bench") != "attention_decode" or _get(r, "impl") != "triton":
            continue
        cfg, ms, ex = _get(r, "config"), _get(r, "ms"), _get(r, "extra")
        ok = "met" if ex["pct_bandwidth"] >= BW_TARGET else f"miss ({ex['pct_bandwidth'] / BW_TARGET:.2f} of it)"
        lines.append(
            f"| {cfg['heads']} | {cfg['batch']} | {cfg['context']} | {ms * 1e3:.1f} | {_eager(idx, 'attention_decode', cfg)} | "
            f"{_get(r, 'bytes') / 1e6:.1f} | {ex['bytes_per_s'] / 1e9:.0f} | "
            f"{ex['pct_bandwidth']:.0f} | {ok} | {_ratio(idx, 'attention_decode', cfg, 'torch_ref', ms)} |"
        )
    lines += ["", "## Paged prefill attention (causal, bf16)", "",
              "| heads | sequences | prefix | new | µs | TFLOP/s | dense SDPA µs |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if _get(r, "bench") != "attention_prefill" or _get(r, "impl") != "triton":
            continue
        cfg, ms, ex = _get(r, "config"), _get(r, "ms"), _get(r, "extra")
        sdpa = idx.get(("attention_prefill", tuple(sorted(cfg.items())), "torch_sdpa_dense"))
        sdpa_us = f"{_get(sdpa, 'ms') * 1e3:.1f}" if sdpa else "-"
        lines.append(
            f"| {cfg['heads']} | {cfg['sequences']} | {cfg['prefix']} | {cfg['new_tokens']} | {ms * 1e3:.1f} | "
            f"{ex['flop_per_s'] / 1e12:.1f} | {sdpa_us} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    """% of copy bandwidth of the decode kernels against bytes moved (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    series = {}
    for r in rows:
        bench, impl, cfg, ex = _get(r, "bench"), _get(r, "impl"), _get(r, "config"), _get(r, "extra")
        if impl != "triton" or bench not in ("lora_decode", "attention_decode"):
            continue
        label = f"{bench} {cfg.get('op', cfg.get('heads'))}" + (f" r{cfg['rank']}" if "rank" in cfg else "")
        series.setdefault(label, []).append((_get(r, "bytes"), ex["pct_bandwidth"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(BW_TARGET, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("bytes the op must move (MB)")
    ax.set_ylabel("% of measured copy bandwidth")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # re-render from a saved JSON: python -m lorafleet.bench.kernels.report kernels.json
    data = json.loads(Path(sys.argv[1]).read_text())
    print(summary_markdown(data["meta"], data["rows"]))

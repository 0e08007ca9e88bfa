"""Fused elementwise kernels (kernels/fused_ops.py) against the torch sequence they replace, on the GPU.

    python -m lorafleet.bench.kernels.fused_bench --out DIR [--quick] [--dtype bfloat16]

Ops: add_rms_norm (residual add + RMSNorm), rope_qk (q and k in place), silu_mul, and `layer`:
one decoder layer's elementwise work as the model runs it (rope_qk + 2 x add_rms_norm +
silu_mul). Shapes: Llama-2-7B (MHA, I 11008) and Llama-3-8B (GQA 32/8, I 14336), T tokens.

Columns per (op, model, T): GPU time replayed from a CUDA graph (`graph`, the decode path); the
eager call (`eager`, do_bench: CUDA events around one call after an L2 flush, so the gaps between
the call's own launches count where the host is slower than the GPU, but not the first launch's
cost); and `host_us`, wall time per call of 100 back-to-back eager calls measured on the host
(about max(host launch cost, GPU time): what an eager prefill step pays per op).
Writes DIR/fused.json (rows as bench/kernels/common.Row) and DIR/fused.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lorafleet.bench.kernels.common import Row, git_commit, measure_ceilings, time_graph_ms, time_ms, write_json
from lorafleet.engine.model import TorchElementwiseOps
from lorafleet.engine.rope import RotaryEmbedding
from lorafleet.formats.model_spec import RopeSpec
from lorafleet.kernels.fused_ops import TritonElementwiseOps

MODELS = {"llama2-7b": (4096, 32, 32, 128, 11008), "llama3-8b": (4096, 32, 8, 128, 14336)}  # H, nh, nkv, D, I
TOKENS = [1, 16, 64, 256, 1024, 4096]
IMPLS = {"fused": TritonElementwiseOps(), "torch": TorchElementwiseOps()}
DEVICE = "cuda"  # a module constant so a CPU dry run (TRITON_INTERPRET=1) can swap it


def host_us(fn, calls: int = 100) -> float:
    """Host time to enqueue one call, synced before and after (where the GPU is the slower, the
    launch queue fills up and this approaches the GPU time instead)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _cases(model: str, tokens: int, dtype) -> dict:
    """op -> (bytes moved, {impl: fn}) over fresh random tensors."""
    hidden, nh, nkv, hd, inter = MODELS[model]
    dev = DEVICE
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    delta = torch.randn_like(x) * 1e-3  # x grows slowly over thousands of in-place repetitions
    w = torch.rand(hidden, device=dev, dtype=dtype) + 0.5
    qkv = torch.randn(tokens, (nh + 2 * nkv) * hd, device=dev, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * inter, device=dev, dtype=dtype)
    rope = RotaryEmbedding(RopeSpec(theta=10000.0), hd, 8192, dtype, torch.device(dev))
    positions = torch.randint(0, 8192, (tokens,), device=dev)
    e = x.element_size()
    norm_bytes = (4 * tokens * hidden + hidden) * e  # read x, delta, w; write x, h
    rope_bytes = (2 * tokens * (nh + nkv) * hd + 2 * tokens * hd) * e  # q, k read + written; cos, sin rows
    silu_bytes = 3 * tokens * inter * e

    def layer(ops):
        ops.rope_qk(qkv, positions, rope, nh, nkv)
        ops.add_rms_norm(x, delta, w, 1e-5)
        ops.silu_mul(gate_up)
        ops.add_rms_norm(x, delta, w, 1e-5)

    return {
        "add_rms_norm": (norm_bytes, {k: (lambda o=o: o.add_rms_norm(x, delta, w, 1e-5)) for k, o in IMPLS.items()}),
        "rope_qk": (rope_bytes, {k: (lambda o=o: o.rope_qk(qkv, positions, rope, nh, nkv)) for k, o in IMPLS.items()}),
        "silu_mul": (silu_bytes, {k: (lambda o=o: o.silu_mul(gate_up)) for k, o in IMPLS.items()}),
        "layer": (2 * norm_bytes + rope_bytes + silu_bytes, {k: (lambda o=o: layer(o)) for k, o in IMPLS.items()}),
    }


def run(ceilings: dict, quick: bool = False, dtype=torch.bfloat16) -> list[Row]:
    rows: list[Row] = []
    for model in MODELS:
        for tokens in TOKENS[::2] if quick else TOKENS:
            for op, (nbytes, fns) in _cases(model, tokens, dtype).items():
                cfg = {"op": op, "model": model, "tokens": tokens, "dtype": str(dtype).removeprefix("torch.")}
                for impl, fn in fns.items():
                    extra = {"host_us": host_us(fn)}
                    rows.append(Row("fused_elementwise", cfg, f"{impl}_graph", time_graph_ms(fn), nbytes, extra=dict(extra)).finish(ceilings))
                    rows.append(Row("fused_elementwise", cfg, f"{impl}_eager", time_ms(fn), nbytes, extra=dict(extra)).finish(ceilings))
            torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[Row]) -> str:
    by_key: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault((r.config["op"], r.config["model"], r.config["tokens"]), {})[r.impl] = r
    lines = [
        f"# Fused elementwise ops vs the torch sequence ({meta['gpu']}, {meta['dtype']})", "",
        f"commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}", "",
        "Times in microseconds. graph: GPU time of a CUDA-graph replay; eager: CUDA events around one plain",
        "call (launch gaps inside the call count); host: wall time per call of back-to-back eager calls",
        "(about max(launch cost, GPU time)); BW %: fused graph bytes/s vs the measured copy bandwidth.", "",
        "| op | model | T | fused graph | torch graph | speedup | fused eager | torch eager | speedup | host fused | host torch | BW % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for (op, model, tokens), r in by_key.items():
        fg, tg, fe, te = (r[k].ms * 1e3 for k in ("fused_graph", "torch_graph", "fused_eager", "torch_eager"))
        lines.append(
            f"| {op} | {model} | {tokens} | {fg:.1f} | {tg:.1f} | {tg / fg:.1f}x | {fe:.1f} | {te:.1f} | {te / fe:.1f}x "
            f"| {r['fused_eager'].extra['host_us']:.1f} | {r['torch_eager'].extra['host_us']:.1f} | {r['fused_graph'].extra['pct_bandwidth']:.0f} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="every other token count")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("the fused-op benchmark needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"commit": git_commit(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "python " + " ".join(sys.argv)}  # fmt: skip
    meta["ceilings"] = measure_ceilings()
    rows = run(meta["ceilings"], quick=args.quick, dtype=getattr(torch, args.dtype))
    write_json(args.out / "fused.json", meta, rows)
    text = markdown(meta, rows)
    (args.out / "fused.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Run every kernel microbenchmark on the GPU; write JSON, a markdown summary and a plot.

    python -m lorafleet.bench.kernels.run_all --out bench/results/kernels [--quick] [--commit HASH]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from lorafleet.bench.kernels import bench_attention, bench_lora
from lorafleet.bench.kernels.common import git_commit, measure_ceilings, write_json
from lorafleet.bench.kernels.report import plot, summary_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="every third configuration only")
    parser.add_argument("--commit", default=None, help="git commit of the code (read from git when omitted)")
    parser.add_argument("--only", choices=["lora", "attention"], default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("the kernel benchmarks need a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    commit = args.commit or git_commit()
    meta = {
        "commit": commit,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    ceilings = measure_ceilings()
    meta["ceilings"] = ceilings
    print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceilings['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for name, module in (("lora", bench_lora), ("attention", bench_attention)):
        if args.only in (None, name):
            start = time.time()
            rows += module.run(ceilings, quick=args.quick)
            print(f"{name}: {time.time() - start:.0f} s", flush=True)
    write_json(args.out / "kernels.json", meta, rows)
    text = summary_markdown(meta, rows)
    (args.out / "kernels.md").write_text(text)
    plot(rows, args.out / "kernels.png")
    print(text)


if __name__ == "__main__":
    main()

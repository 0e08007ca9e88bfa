"""What the LoRA part costs under tensor parallelism, per scheme, from shapes alone (no GPU).

For Llama-7B shapes and W in {2, 4, 8}: bytes each GPU sends per token for the LoRA part (ring
algorithms: bench/tp_comm_model.py, checked against the real collectives by
tests/tp/test_distributed.py), LoRA collectives per layer, adapter bytes per rank, and a MODELED
step cost (collective latency + bytes over link bandwidth + adapter bytes read from HBM) for a
decode step and a prefill chunk. The model's constants are assumptions, printed with the tables;
no GPU was used, so none of this is a measurement.

    python -m lorafleet.bench.tp_comm                  # writes bench/results/tp/comm.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafleet.bench.report import environment
from lorafleet.bench.shapes import SHAPES, VOCAB
from lorafleet.bench.tp_comm_model import adapter_bytes_per_rank, bytes_sent, layer_collectives, per_token_bytes
from lorafleet.engine.tp.shard_adapters import Scheme
from lorafleet.formats.model_spec import ModelSpec, RopeSpec

OUT = Path(__file__).resolve().parent / "results" / "tp"
ELEM = 2  # bf16


def spec_of(shape: str) -> ModelSpec:
    s = SHAPES[shape]
    return ModelSpec(model_type="llama", hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                     num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                     num_kv_heads=s["num_key_value_heads"], head_dim=s["hidden_size"] // s["num_attention_heads"],
                     vocab_size=VOCAB, max_position=4096, rms_norm_eps=1e-5, rope=RopeSpec(theta=10000.0),
                     tie_word_embeddings=False, attention_bias=False, eos_token_ids=(2,), bos_token_id=1)


def step_cost_us(spec: ModelSpec, world: int, scheme: Scheme, rank: int, tokens: int, distinct: int, a: argparse.Namespace) -> dict:
    """Modeled LoRA cost of one forward step on one GPU: its collectives (latency + bytes / bus
    bandwidth; the fused scheme's extra elements ride in the base all-reduce, no latency) plus
    reading `distinct` adapters' shares from HBM once each."""
    comm = 0.0
    for c in layer_collectives(spec, world, scheme, rank, tokens, ELEM):
        extra = c.call.elements - tokens * spec.hidden_size if c.purpose == "base+lora" else None
        if c.purpose == "lora":
            comm += a.alpha_us + bytes_sent(c.call, world) / (a.bus_gbps * 1e3)
        elif extra:
            comm += 2 * (world - 1) / world * extra * ELEM / (a.bus_gbps * 1e3)
    comm *= spec.num_layers
    read = distinct * adapter_bytes_per_rank(spec, world, scheme, rank, ELEM) / (a.hbm_tbps * 1e6)
    base = 2 * spec.num_layers * (a.alpha_us + 2 * (world - 1) / world * tokens * spec.hidden_size * ELEM / (a.bus_gbps * 1e3))
    return {"comm_us": comm, "adapter_read_us": read, "lora_total_us": comm + read, "base_allreduce_us": base}


def build(a: argparse.Namespace) -> list[dict]:
    spec, rows = spec_of(a.shape), []
    single = adapter_bytes_per_rank(spec, 1, Scheme.SLORA, 1, ELEM)  # bytes per unit of rank on one GPU
    for world in a.worlds:
        for rank in a.ranks:
            for scheme in Scheme:
                tok = per_token_bytes(spec, world, scheme, rank, ELEM)
                row = {"shape": a.shape, "world": world, "rank": rank, "scheme": scheme.value,
                       "lora_bytes_per_token": tok["lora"], "base_bytes_per_token": tok["base"],
                       "lora_collectives_per_layer": tok["lora_collectives_per_layer"],
                       "adapter_mb_per_rank": adapter_bytes_per_rank(spec, world, scheme, rank, ELEM) / 1e6,
                       "adapter_mb_one_gpu": single * rank / 1e6}
                row["decode"] = step_cost_us(spec, world, scheme, rank, a.decode_batch, a.decode_batch, a)
                row["prefill"] = step_cost_us(spec, world, scheme, rank, a.prefill_tokens, a.prefill_adapters, a)
                rows.append(row)
    return rows


def markdown(rows: list[dict], a: argparse.Namespace, env: dict) -> str:
    lines = [
        "# LoRA under tensor parallelism: communication per scheme (analytic, no GPU)", "",
        f"commit `{env['commit']}`, command `{env['command']}`, {env['date']}", "",
        f"Llama shape `{a.shape}` (bf16). **No GPU numbers**: bytes are exact for the code in "
        "services/engine/tp (the collectives it makes are checked against this model by the tests); the "
        "step costs are a MODEL with assumed constants: collective latency "
        f"{a.alpha_us} us, bus bandwidth {a.bus_gbps} GB/s, HBM read {a.hbm_tbps} TB/s. Decode step: "
        f"{a.decode_batch} tokens of {a.decode_batch} distinct adapters; prefill chunk: {a.prefill_tokens} tokens "
        f"of {a.prefill_adapters} adapters.", "",
        "Schemes: **slora** (A rank-split + all-gather for q/k/v, gate/up; A row-split + all-reduce for o, down; "
        "B split by columns), **replicated_a** (A whole for q/k/v, gate/up: no gather), **gather_outputs** "
        "(adapter whole; full-width inputs of o/down all-gathered), **fused** (replicated A, and o/down's "
        "rank-sized partial intermediate appended to the base model's own all-reduce: no LoRA collective).", "",
        "| W | rank | scheme | LoRA bytes/token/GPU | base bytes/token/GPU | LoRA/base | LoRA collectives/layer "
        "| adapter MB/GPU (1 GPU) | decode: comm + read = LoRA us (base all-reduce us) | prefill: comm + read = LoRA us (base us) |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        d, p = r["decode"], r["prefill"]
        lines.append(
            f"| {r['world']} | {r['rank']} | {r['scheme']} | {r['lora_bytes_per_token']:,.0f} | {r['base_bytes_per_token']:,.0f} "
            f"| {r['lora_bytes_per_token'] / r['base_bytes_per_token']:.2%} | {r['lora_collectives_per_layer']} "
            f"| {r['adapter_mb_per_rank']:.1f} ({r['adapter_mb_one_gpu']:.1f}) "
            f"| {d['comm_us']:.0f} + {d['adapter_read_us']:.0f} = {d['lora_total_us']:.0f} ({d['base_allreduce_us']:.0f}) "
            f"| {p['comm_us']:.0f} + {p['adapter_read_us']:.0f} = {p['lora_total_us']:.0f} ({p['base_allreduce_us']:.0f}) |")
    lines += ["", "## Cheapest scheme under the model, per setting", "", "| W | rank | decode | prefill |", "|---|---|---|---|"]
    for world in a.worlds:
        for rank in a.ranks:
            group = [r for r in rows if r["world"] == world and r["rank"] == rank]
            best = {k: min(group, key=lambda r: r[k]["lora_total_us"])["scheme"] for k in ("decode", "prefill")}
            lines.append(f"| {world} | {rank} | {best['decode']} | {best['prefill']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=[s for s in SHAPES if s != "tiny"])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--prefill-adapters", type=int, default=8)
    p.add_argument("--alpha-us", type=float, default=8.0, help="assumed latency of one small NCCL collective")
    p.add_argument("--bus-gbps", type=float, default=300.0, help="assumed NCCL bus bandwidth, GB/s")
    p.add_argument("--hbm-tbps", type=float, default=4.28, help="HBM bandwidth, TB/s (DESIGN.md's H200 copy figure)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    rows = build(a)
    env = environment()
    a.out.mkdir(parents=True, exist_ok=True)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    (a.out / "comm.json").write_text(json.dumps({"environment": env, "params": params, "rows": rows}, indent=1))
    text = markdown(rows, a, env)
    (a.out / "comm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

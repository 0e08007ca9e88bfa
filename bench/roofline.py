"""Roofline bound of one trace on one GPU: bytes moved and FLOPs, against measured ceilings.

The bound says how fast the trace could be served if every step ran at the GPU's ceiling
(max of bytes / bandwidth and FLOPs / peak) and the GPU never idled. Batch assumption, stated in
every record: decodes run B = min(max_num_seqs, requests whose KV fits the pool) at a time;
prefill runs in steps of max_batched_tokens tokens. Per step:

    decode:  bytes = weights + B * KV of one token's context + distinct adapters(B) * adapter bytes
             flops = B * (2 * linear params + 2 * V * H + LoRA + 4 * L * q_width * context)
    prefill: bytes = weights + distinct adapters(tokens / mean input) * adapter bytes
             flops = tokens * (2 * linear params + LoRA) + causal attention + one logits row a request

Adapter copies from host memory (PCIe) are not counted: they overlap compute when prefetched.
Distinct adapters in a batch of B draws from n uniform adapters: n * (1 - (1 - 1/n)^B).

    python -m lorafleet.bench.roofline --setting S1 --n 5 2000
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from lorafleet.bench.shapes import SHAPES, VOCAB
from lorafleet.bench.workload import SETTINGS, Setting, TraceRequest, generate_trace

# Measured on one H200 (bench/results/kernels): copy ~4.3 TB/s counting read + write, so about
# 4.0 TB/s of effective reads; bf16 dense matmul ~790 TFLOP/s.
H200_READ_BYTES_S = 4.0e12
H200_BF16_FLOPS = 790e12
H200_MEMORY_BYTES = 141e9


@dataclass(frozen=True)
class Hardware:
    read_bytes_s: float = H200_READ_BYTES_S
    flops: float = H200_BF16_FLOPS
    memory_bytes: float = H200_MEMORY_BYTES
    memory_fraction: float = 0.90  # what the engine's pool sizing leaves usable


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    kv_width: int  # num_key_value_heads * head_dim
    q_width: int
    vocab: int = VOCAB

    @classmethod
    def named(cls, name: str) -> "Shape":
        s = SHAPES[name]
        head_dim = s["hidden_size"] // s["num_attention_heads"]
        return cls(s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                   s["num_key_value_heads"] * head_dim, s["num_attention_heads"] * head_dim)

    @property
    def linear_params(self) -> int:  # per token through the decoder (lm_head counted apart)
        h, i = self.hidden, self.intermediate
        return self.layers * (h * (self.q_width + 2 * self.kv_width) + self.q_width * h + 3 * h * i)

    @property
    def weight_bytes(self) -> int:  # bf16: decoder + embedding + lm_head
        return 2 * (self.linear_params + 2 * self.vocab * self.hidden)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_width * 2  # K and V, bf16

    def module_dims(self, module: str) -> int:  # in + out features
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        return {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
                "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}[module]


def adapter_bytes(shape: Shape, setting: Setting, rank: int) -> int:
    return 2 * shape.layers * rank * sum(shape.module_dims(m) for m in setting.modules)


def distinct(n: int, draws: float) -> float:
    return 0.0 if n == 0 else n * (1.0 - (1.0 - 1.0 / n) ** draws)


def estimate(setting: Setting, trace: list[TraceRequest], n: int, max_num_seqs: int = 512,
             max_batched_tokens: int = 4096, hw: Hardware = Hardware()) -> dict:
    """Upper bound for serving `trace` with n adapters (n = 0: base model only)."""
    sh = Shape.named(setting.shape)
    reqs = len(trace)
    ins = [r.input_len for r in trace]
    outs = [r.output_len for r in trace]
    decode_tokens = sum(outs)
    # sum over decode tokens of the context each one attends to (prompt + tokens so far)
    context_sum = sum(i * o + o * (o - 1) / 2 for i, o in zip(ins, outs))
    mean_context = context_sum / decode_tokens
    pool_bytes = hw.memory_bytes * hw.memory_fraction - sh.weight_bytes - (1 << 30)
    batch = max(1.0, min(max_num_seqs, pool_bytes / (sh.kv_bytes_per_token * mean_context)))
    ranks = [setting.ranks[k % len(setting.ranks)] for k in range(len(setting.ranks))]
    mean_adapter = sum(adapter_bytes(sh, setting, r) for r in ranks) / len(ranks) if n else 0.0
    lora_flops_token = (sum(2 * r * sum(sh.module_dims(m) for m in setting.modules) for r in ranks)
                        / len(ranks) * sh.layers) if n else 0.0

    dense_token = 2 * sh.linear_params + lora_flops_token
    # decode: decode_tokens / batch steps of `batch` tokens each
    d_steps = decode_tokens / batch
    d_bytes = sh.weight_bytes + batch * mean_context * sh.kv_bytes_per_token + distinct(n, batch) * mean_adapter
    d_flops = batch * (dense_token + 2 * sh.vocab * sh.hidden + 4 * sh.layers * sh.q_width * mean_context)
    d_time = d_steps * max(d_bytes / hw.read_bytes_s, d_flops / hw.flops)
    # prefill: prompt tokens in steps of max_batched_tokens
    prompt_tokens = sum(ins)
    p_steps = max(1.0, prompt_tokens / max_batched_tokens)
    per_step_reqs = reqs / p_steps
    p_bytes = sh.weight_bytes + distinct(n, per_step_reqs) * mean_adapter + prompt_tokens / p_steps * sh.kv_bytes_per_token
    attn = sum(2 * sh.layers * sh.q_width * i * i for i in ins)  # QK^T and PV over a causal half
    p_flops_total = prompt_tokens * dense_token + attn + reqs * 2 * sh.vocab * sh.hidden
    p_time = max(p_steps * p_bytes / hw.read_bytes_s, p_flops_total / hw.flops)
    total = d_time + p_time
    arrivals_span = trace[-1].arrival - trace[0].arrival if reqs > 1 else 0.0
    return {
        "setting": setting.name, "mode": "roofline" if n else "roofline-base", "n": n, "requests": reqs,
        "throughput_req_s": reqs / total, "throughput_tok_s": decode_tokens / total,
        "arrival_limit_req_s": reqs / arrivals_span if arrivals_span else None,
        "batch_assumed": batch, "decode_s": d_time, "prefill_s": p_time,
        "decode_step_ms": d_time / d_steps * 1e3, "decode_step_gb": d_bytes / 1e9,
        "adapter_gb_per_decode_step": distinct(n, batch) * mean_adapter / 1e9,
        "hardware": asdict(hw),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="S1")
    p.add_argument("--n", type=int, nargs="+", default=[0, 5, 100, 1000, 2000, 10000])
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--max-num-seqs", type=int, default=512)
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    for n in args.n:
        trace = generate_trace(max(n, 1), 1.0, args.rate, 1.0, args.duration)
        print(json.dumps(estimate(setting, trace, n, args.max_num_seqs)))


if __name__ == "__main__":
    main()

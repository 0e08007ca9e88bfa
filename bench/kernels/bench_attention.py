"""Paged attention microbenchmarks: decode (Llama-7B MHA and an 8-KV-head GQA layer) over 1..128
sequences of 512..8192 tokens, and causal prefill with a cached prefix.

Decode bytes: every cached K and V element once, plus q and out. Prefill FLOPs: causal
4 * n_heads * D * sum over queries of visible keys.
"""

from __future__ import annotations

import torch

from lorafleet.bench.kernels.common import Row, time_graph_ms, time_ms
from lorafleet.engine.ops.torch_ref import TorchAttentionOps
from lorafleet.kernels.attention_ops import TritonAttentionOps
from tests.kernels.kernel_fixtures import make_attention_case

HEADS = {"llama7b-mha": (32, 32, 128), "gqa8-d128": (32, 8, 128)}
DECODE = [(1, 2048), (8, 512), (8, 8192), (32, 2048), (64, 4096), (128, 2048), (128, 512)]
PREFILL = [(1, 0, 2048), (4, 0, 1024), (2, 2048, 512)]  # (sequences, cached prefix, new tokens)
BF16 = 2
DEVICE, DTYPE = "cuda", torch.bfloat16  # module constants so a CPU dry run can swap them


def run(ceilings: dict, quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    ops, ref = TritonAttentionOps(), TorchAttentionOps()
    for name, (heads, kv_heads, head_dim) in HEADS.items():
        for batch, ctx in DECODE[::2] if quick else DECODE:
            pool, meta, q, k, v = make_attention_case([ctx] * batch, [], heads, kv_heads, head_dim, 16, DTYPE, DEVICE, seed=batch)
            cfg = {"heads": name, "batch": batch, "context": ctx}
            nbytes = (2 * batch * ctx * kv_heads * head_dim + 2 * batch * heads * head_dim) * BF16
            flops = 4.0 * batch * ctx * heads * head_dim
            scale = head_dim**-0.5
            attend = lambda: ops.attend(q, pool, 0, meta, scale)  # noqa: E731
            timings = {"triton": time_graph_ms(attend), "triton_eager": time_ms(attend)}
            if batch <= 8:
                timings["torch_ref"] = time_ms(lambda: ref.attend(q, pool, 0, meta, scale), rep=20)
            for impl, ms in timings.items():
                rows.append(Row("attention_decode", cfg, impl, ms, nbytes, flops).finish(ceilings))
            del pool
        for seqs, prefix, new in PREFILL:
            pool, meta, q, k, v = make_attention_case([], [(prefix, new)] * seqs, heads, kv_heads, head_dim, 16, DTYPE, DEVICE, seed=seqs)
            visible = seqs * sum(prefix + i + 1 for i in range(new))
            flops = 4.0 * heads * head_dim * visible
            nbytes = (2 * seqs * (prefix + new) * kv_heads * head_dim + 2 * seqs * new * heads * head_dim) * BF16
            cfg = {"heads": name, "sequences": seqs, "prefix": prefix, "new_tokens": new}
            scale = head_dim**-0.5
            attend = lambda: ops.attend(q, pool, 0, meta, scale)  # noqa: E731
            rows.append(Row("attention_prefill", cfg, "triton", time_graph_ms(attend), nbytes, flops).finish(ceilings))
            qs = q.view(seqs, new, heads, head_dim).transpose(1, 2)
            if prefix == 0:  # torch's fused SDPA on contiguous tensors, for scale (no paging)
                kd = torch.randn(seqs, heads, new, head_dim, device=DEVICE, dtype=DTYPE)
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, kd, kd, is_causal=True)  # noqa: E731
                rows.append(Row("attention_prefill", cfg, "torch_sdpa_dense", time_graph_ms(sdpa), nbytes, flops).finish(ceilings))
            del pool
    return rows

"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) with its own forward over the unified pool.

The base model is one dense matmul per projection for the whole batch; the LoRA part is added by
the LoRA ops (shrink, then expand into the matching output columns) for the tokens that have an
adapter:  y = x W^T + sum over adapters (x_i A_i^T) B_i^T * scale_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model_spec import MODULE_INDEX, ModelSpec
from .ops.base import AttentionMeta, AttentionOps, LoraContext, LoraOps
from .rope import RotaryEmbedding
from .weights_loader import ModelWeights

QKV = (MODULE_INDEX["q_proj"], MODULE_INDEX["k_proj"], MODULE_INDEX["v_proj"])
O = (MODULE_INDEX["o_proj"],)
GATE_UP = (MODULE_INDEX["gate_proj"], MODULE_INDEX["up_proj"])
DOWN = (MODULE_INDEX["down_proj"],)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As Llama: normalise in fp32, cast back, then scale (order matters for bf16 equality).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    def __init__(self, spec: ModelSpec, weights: ModelWeights, lora_ops: LoraOps, attn_ops: AttentionOps):
        self.spec = spec
        self.w = weights
        self.lora_ops = lora_ops
        self.attn_ops = attn_ops
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.rope = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position, self.dtype, self.device)
        self.scale = spec.head_dim ** -0.5
        s = spec
        self._qkv_offsets = (0, s.q_width, s.q_width + s.kv_width)
        self._gate_up_offsets = (0, s.intermediate_size)

    def _linear(self, x, weight, layer, modules, offsets, lora: LoraContext | None, bias=None):
        y = F.linear(x, weight, bias)  # [T, N]
        if lora is not None and not lora.batch.empty:
            u = self.lora_ops.shrink(x, layer, modules, lora)  # [T, len(modules), R]
            self.lora_ops.expand(y, u, layer, modules, offsets, lora)
        return y

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        pool: torch.Tensor,  # [L, num_pages, P]
        attn: AttentionMeta,
        lora: LoraContext | None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [T, H]."""
        s = self.spec
        x = self.w.embed[input_ids]  # [T, H]
        for i, lw in enumerate(self.w.layers):
            h = rms_norm(x, lw.input_norm, s.rms_norm_eps)
            qkv = self._linear(h, lw.qkv, i, QKV, self._qkv_offsets, lora, lw.qkv_bias)  # [T, q + 2kv]
            q, k, v = qkv.split((s.q_width, s.kv_width, s.kv_width), dim=-1)
            q = self.rope.apply(q.reshape(-1, s.num_heads, s.head_dim), positions)  # [T, nh, D]
            k = self.rope.apply(k.reshape(-1, s.num_kv_heads, s.head_dim), positions)  # [T, nkv, D]
            v = v.reshape(-1, s.num_kv_heads, s.head_dim)
            self.attn_ops.write_kv(pool, i, k, v, attn)
            o = self.attn_ops.attend(q, pool, i, attn, self.scale).reshape(-1, s.q_width)  # [T, q]
            x = x + self._linear(o, lw.o, i, O, (0,), lora)
            h = rms_norm(x, lw.post_norm, s.rms_norm_eps)
            gu = self._linear(h, lw.gate_up, i, GATE_UP, self._gate_up_offsets, lora)  # [T, 2I]
            gate, up = gu.chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, lw.down, i, DOWN, (0,), lora)
        return rms_norm(x, self.w.final_norm, s.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, V] float32."""
        return F.linear(hidden, self.w.lm_head).float()

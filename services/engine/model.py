"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) with its own forward over the unified pool.

The base model is one dense matmul per projection for the whole batch; the LoRA part is added by
the LoRA ops (shrink, then expand into the matching output columns) for the tokens that have an
adapter:  y = x W^T + sum over adapters (x_i A_i^T) B_i^T * scale_i.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from lorafleet.formats.model_spec import LORA_MODULES, MODULE_INDEX, ModelSpec

from .ops.base import AttentionMeta, AttentionOps, LoraContext, LoraOps
from .rope import RotaryEmbedding
from .weights_loader import ModelWeights

QKV = (MODULE_INDEX["q_proj"], MODULE_INDEX["k_proj"], MODULE_INDEX["v_proj"])
O = (MODULE_INDEX["o_proj"],)
GATE_UP = (MODULE_INDEX["gate_proj"], MODULE_INDEX["up_proj"])
DOWN = (MODULE_INDEX["down_proj"],)
_NAMES = {group: frozenset(LORA_MODULES[m] for m in group) for group in (QKV, O, GATE_UP, DOWN)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As Llama: normalise in fp32, cast back, then scale (order matters for bf16 equality).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class ElementwiseOps(Protocol):
    """The decoder's elementwise work between the matmuls (shapes: T tokens, H hidden, I intermediate)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] -> rms_norm(x, weight, eps) [T, H]; x unchanged."""
        ...

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta in place (the residual stream, [T, H]), then returns rms_norm(x, weight, eps)."""
        ...

    def rope_qk(self, qkv: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, num_heads: int, num_kv_heads: int) -> None:
        """Rotates the q and k columns of qkv [T, (nh + 2 nkv) * D] in place (RotaryEmbedding.apply)."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] -> F.silu(gate) * up [T, I]."""
        ...


class TorchElementwiseOps:
    """The torch sequence: the CPU engine's ops and the reference the fused kernels are tested against."""

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, x, delta, weight, eps):
        x.add_(delta)  # same rounding as x + delta: one fp32 sum rounded to x's dtype
        return rms_norm(x, weight, eps)

    def rope_qk(self, qkv, positions, rope, num_heads, num_kv_heads):
        rope.apply_qk_(qkv, positions, num_heads, num_kv_heads)

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def default_elementwise_ops(device: torch.device) -> ElementwiseOps:
    """The fused Triton kernels on CUDA (when Triton imports), the torch sequence elsewhere."""
    if device.type != "cuda":
        return TorchElementwiseOps()
    try:
        from lorafleet.kernels.fused_ops import TritonElementwiseOps
    except ImportError:
        return TorchElementwiseOps()
    return TritonElementwiseOps()


class LlamaModel:
    """elementwise_ops: None picks default_elementwise_ops(the weights' device); the decode CUDA
    graphs (cuda_graphs.py) build their model that way, so on CUDA they replay the fused kernels."""

    def __init__(self, spec: ModelSpec, weights: ModelWeights, lora_ops: LoraOps, attn_ops: AttentionOps,
                 elementwise_ops: ElementwiseOps | None = None):  # fmt: skip
        self.spec = spec
        self.w = weights
        self.lora_ops = lora_ops
        self.attn_ops = attn_ops
        self.ew = elementwise_ops if elementwise_ops is not None else default_elementwise_ops(weights.embed.device)
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.rope = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position, self.dtype, self.device)
        self.scale = spec.head_dim ** -0.5
        s = spec
        self._qkv_offsets = (0, s.q_width, s.q_width + s.kv_width)
        self._gate_up_offsets = (0, s.intermediate_size)

    def _linear(self, x, weight, layer, modules, offsets, lora: LoraContext | None, bias=None):
        y = F.linear(x, weight, bias)  # [T, N]
        # A group no adapter of the batch targets launches nothing (its kernels would only exit).
        if lora is not None and not lora.batch.empty and lora.batch.targets_any(_NAMES[modules]):
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
        s, ew, eps = self.spec, self.ew, self.spec.rms_norm_eps
        layers = self.w.layers
        x = self.w.embed[input_ids]  # [T, H], a fresh tensor: the residual stream, updated in place
        h = ew.rms_norm(x, layers[0].input_norm, eps) if layers else x
        for i, lw in enumerate(layers):
            qkv = self._linear(h, lw.qkv, i, QKV, self._qkv_offsets, lora, lw.qkv_bias)  # [T, q + 2kv]
            ew.rope_qk(qkv, positions, self.rope, s.num_heads, s.num_kv_heads)  # q, k rotated in place
            q, k, v = qkv.split((s.q_width, s.kv_width, s.kv_width), dim=-1)
            q = q.reshape(-1, s.num_heads, s.head_dim)  # [T, nh, D] (a view of qkv)
            k = k.reshape(-1, s.num_kv_heads, s.head_dim)  # [T, nkv, D]
            v = v.reshape(-1, s.num_kv_heads, s.head_dim)
            self.attn_ops.write_kv(pool, i, k, v, attn)
            o = self.attn_ops.attend(q, pool, i, attn, self.scale).reshape(-1, s.q_width)  # [T, q]
            h = ew.add_rms_norm(x, self._linear(o, lw.o, i, O, (0,), lora), lw.post_norm, eps)  # x += o W_o^T
            gu = self._linear(h, lw.gate_up, i, GATE_UP, self._gate_up_offsets, lora)  # [T, 2I]
            down = self._linear(ew.silu_mul(gu), lw.down, i, DOWN, (0,), lora)  # [T, H]
            # This layer's residual add fused with the next layer's input norm (or the final norm).
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.final_norm
            h = ew.add_rms_norm(x, down, next_norm, eps)
        return h if layers else ew.rms_norm(x, self.w.final_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, V] float32."""
        return F.linear(hidden, self.w.lm_head).float()

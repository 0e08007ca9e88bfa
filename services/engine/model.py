"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) with its own forward over the unified pool,
on one device or as one rank of a tensor-parallel group (the same forward: only the projections
know the group, see LlamaModel).

The base model is one dense matmul per projection for the whole batch; the LoRA part is added by
the LoRA ops (shrink, then expand into the matching output columns) for the tokens that have an
adapter:  y = x W^T + sum over adapters (x_i A_i^T) B_i^T * scale_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from lorafleet.formats.model_spec import MODULE_INDEX, ModelSpec

from .lora_step import LoraStep
from .ops.base import AttentionMeta, AttentionOps
from .rope import RotaryEmbedding
from .tp.collectives import TpComm, single_rank
from .tp.linear import column_parallel, row_parallel
from .tp.partition import TpPlan, make_plan
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


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel group: the plan (its heads, KV heads and columns,
    tp/partition.py) and the group's collectives (tp/collectives.py)."""

    plan: TpPlan
    comm: TpComm


class LlamaModel:
    """The decoder, on one device or as one rank of a tensor-parallel group.

    tp None: world 1 (every collective the identity). tp given: the rank holds its heads, KV
    heads and intermediate columns (tp/shard_weights.py) and a pool of its own KV heads. Either
    way q/k/v and gate/up are column-parallel, o and down row-parallel (tp/linear.py: at world 1
    one matmul plus the LoRA part, with no collective), and the LoRA part is the step's LoraStep
    (its ops and tables; under TP its scheme). Activations between blocks are the same on every rank.

    elementwise_ops: what ops/select.py chose (the fused kernels or the torch sequence); None:
    the torch sequence.
    """

    def __init__(self, spec: ModelSpec, weights: ModelWeights, attn_ops: AttentionOps,
                 elementwise_ops: ElementwiseOps | None = None, tp: TensorParallel | None = None):  # fmt: skip
        if tp is None:
            tp = TensorParallel(make_plan(spec, 1, 0), single_rank())
        if (tp.comm.world, tp.comm.rank) != (tp.plan.world, tp.plan.rank):
            raise ValueError(f"plan is rank {tp.plan.rank} of {tp.plan.world}, the group rank {tp.comm.rank} of "
                             f"{tp.comm.world}")
        self.spec, self.w, self.attn_ops, self.tp = spec, weights, attn_ops, tp
        self.ew = elementwise_ops if elementwise_ops is not None else TorchElementwiseOps()
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.rope = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position, self.dtype, self.device)
        self.scale = spec.head_dim ** -0.5
        self.heads, self.kv_heads = tp.plan.heads_per_rank, tp.plan.kv_heads_per_rank  # this rank's
        q_width, kv_width = self.heads * spec.head_dim, self.kv_heads * spec.head_dim
        self._qkv_split = (q_width, kv_width, kv_width)
        self._qkv_offsets = (0, q_width, q_width + kv_width)
        self._gate_up_offsets = (0, spec.intermediate_size // tp.plan.world)

    def _column(self, x, weight, bias, layer, modules, offsets, lora):
        """x [T, H] (the same on every rank) -> this rank's output columns [T, N_loc]."""
        return column_parallel(x, weight, bias, layer, modules, offsets, lora, self.tp.comm)

    def _row(self, x, weight, layer, modules, lora):
        """x [T, in_loc] (this rank's input columns) -> the whole output [T, H], the same on every rank."""
        return row_parallel(x, weight, layer, modules, self.tp.plan, lora, self.tp.comm)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        pool: torch.Tensor,  # [L, num_pages, P]: under tp, this rank's KV heads only
        attn: AttentionMeta,
        lora: LoraStep | None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [T, H] (under tp, the same on every rank)."""
        D, ew, eps = self.spec.head_dim, self.ew, self.spec.rms_norm_eps
        layers = self.w.layers
        x = self.w.embed[input_ids]  # [T, H], a fresh tensor: the residual stream, updated in place
        h = ew.rms_norm(x, layers[0].input_norm, eps) if layers else x
        for i, lw in enumerate(layers):
            qkv = self._column(h, lw.qkv, lw.qkv_bias, i, QKV, self._qkv_offsets, lora)  # [T, q + 2kv] (per rank)
            ew.rope_qk(qkv, positions, self.rope, self.heads, self.kv_heads)  # q, k rotated in place
            q, k, v = qkv.split(self._qkv_split, dim=-1)
            q = q.reshape(-1, self.heads, D)  # [T, nh, D] (a view of qkv)
            k = k.reshape(-1, self.kv_heads, D)  # [T, nkv, D]
            v = v.reshape(-1, self.kv_heads, D)
            self.attn_ops.write_kv(pool, i, k, v, attn)
            o = self.attn_ops.attend(q, pool, i, attn, self.scale).reshape(-1, self._qkv_split[0])  # [T, q]
            h = ew.add_rms_norm(x, self._row(o, lw.o, i, O, lora), lw.post_norm, eps)  # x += o W_o^T
            gu = self._column(h, lw.gate_up, None, i, GATE_UP, self._gate_up_offsets, lora)  # [T, 2I] (per rank)
            down = self._row(ew.silu_mul(gu), lw.down, i, DOWN, lora)  # [T, H]
            # This layer's residual add fused with the next layer's input norm (or the final norm).
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.final_norm
            h = ew.add_rms_norm(x, down, next_norm, eps)
        return h if layers else ew.rms_norm(x, self.w.final_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, V] float32 (lm_head replicated under tp: no collective)."""
        return F.linear(hidden, self.w.lm_head).float()

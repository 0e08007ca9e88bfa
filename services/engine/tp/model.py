"""One rank's Llama-family decoder under tensor parallelism (mirrors services/engine/model.py).

Each rank holds its heads, KV heads and intermediate columns (shard_weights), a pool of pages of
its own KV heads only (PoolGeometry.for_model(local_spec(spec, W), ...)), and its adapter shares.
Activations between blocks are replicated; per block the base model adds two all-reduces (after
o and down) and the LoRA part the scheme's small collectives (linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.formats.model_spec import ModelSpec

from ..model import ElementwiseOps, TorchElementwiseOps
from ..ops.base import AttentionMeta, AttentionOps
from ..rope import RotaryEmbedding
from ..weights_loader import ModelWeights
from .collectives import TpComm
from .linear import column_parallel, row_parallel
from .lora_math import TpLoraBatch
from .partition import TpPlan

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class TpLlamaModel:
    def __init__(self, spec: ModelSpec, plan: TpPlan, weights: ModelWeights, attn_ops: AttentionOps, comm: TpComm,
                 elementwise_ops: ElementwiseOps | None = None):  # fmt: skip
        """`weights`: this rank's shard (shard_model); `comm`: the group of the plan's ranks;
        `elementwise_ops`: the torch sequence by default, the fused kernels when the engine asks."""
        if (comm.world, comm.rank) != (plan.world, plan.rank):
            raise ValueError(f"plan is rank {plan.rank} of {plan.world}, the group rank {comm.rank} of {comm.world}")
        self.spec, self.plan, self.w, self.attn_ops, self.comm = spec, plan, weights, attn_ops, comm
        self.ew = elementwise_ops if elementwise_ops is not None else TorchElementwiseOps()
        self.dtype, self.device = weights.embed.dtype, weights.embed.device
        self.rope = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position, self.dtype, self.device)
        self.scale = spec.head_dim ** -0.5
        self.heads = plan.heads_per_rank
        self.kv_heads = plan.kv_heads_per_rank
        q_loc, kv_loc = self.heads * spec.head_dim, self.kv_heads * spec.head_dim
        self._qkv_split = (q_loc, kv_loc, kv_loc)
        self._qkv_offsets = (0, q_loc, q_loc + kv_loc)
        inter_loc = spec.intermediate_size // plan.world
        self._gate_up_offsets = (0, inter_loc)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        pool: torch.Tensor,  # [L, num_pages, P_loc]: this rank's KV heads only
        attn: AttentionMeta,
        lora: TpLoraBatch | None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [T, H], the same on every rank."""
        s, D, comm, plan, ew, eps = self.spec, self.spec.head_dim, self.comm, self.plan, self.ew, self.spec.rms_norm_eps
        layers = self.w.layers
        x = self.w.embed[input_ids]  # [T, H], a fresh tensor: the residual stream, updated in place
        h = ew.rms_norm(x, layers[0].input_norm, eps) if layers else x
        for i, lw in enumerate(layers):
            qkv = column_parallel(h, lw.qkv, lw.qkv_bias, i, QKV, self._qkv_offsets, lora, comm)  # [T, q/W + 2 kv_loc]
            ew.rope_qk(qkv, positions, self.rope, self.heads, self.kv_heads)  # this rank's q, k rotated in place
            q, k, v = qkv.split(self._qkv_split, dim=-1)
            q = q.reshape(-1, self.heads, D)  # [T, nh/W, D] (a view of qkv)
            k = k.reshape(-1, self.kv_heads, D)  # [T, kv_loc, D]
            v = v.reshape(-1, self.kv_heads, D)
            self.attn_ops.write_kv(pool, i, k, v, attn)
            o = self.attn_ops.attend(q, pool, i, attn, self.scale).reshape(-1, self._qkv_split[0])  # [T, q/W]
            # x += o W_o^T (all-reduced: the same on every rank), then the post-attention norm
            h = ew.add_rms_norm(x, row_parallel(o, lw.o, i, "o_proj", plan, lora, comm), lw.post_norm, eps)
            gu = column_parallel(h, lw.gate_up, None, i, GATE_UP, self._gate_up_offsets, lora, comm)  # [T, 2I/W]
            down = row_parallel(ew.silu_mul(gu), lw.down, i, "down_proj", plan, lora, comm)  # [T, H]
            # This layer's residual add fused with the next layer's input norm (or the final norm).
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.final_norm
            h = ew.add_rms_norm(x, down, next_norm, eps)
        return h if layers else ew.rms_norm(x, self.w.final_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, V] float32 (lm_head replicated: no collective)."""
        return F.linear(hidden, self.w.lm_head).float()

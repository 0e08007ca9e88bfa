"""Rank i's shard of the base model's fused weights (weights_loader.ModelWeights).

Per layer, with q = nh*D, kv = nkv*D, W ranks (slices from TpPlan)::

    qkv     [q + 2kv, H]  ->  [q/W + 2 kv_loc, H]   rows q[q_cols] ; k[kv_cols] ; v[kv_cols], re-fused
    bias    [q + 2kv]     ->  [q/W + 2 kv_loc]      (Qwen2) the same rows
    o       [H, q]        ->  [H, q/W]              input columns q_cols
    gate_up [2I, H]       ->  [2 I/W, H]            rows gate[inter_cols] ; up[inter_cols], re-fused
    down    [H, I]        ->  [H, I/W]              input columns inter_cols
    norms   [H]           ->  replicated

kv_loc = nkv/W KV heads, or one replicated KV head when nkv < W. The embedding, final norm and
lm_head stay replicated (a vocabulary-parallel embedding and head would save 2*V*H/W*(W-1)
elements per rank; left for later, see docs/tp.md).
"""

from __future__ import annotations

import torch

from lorafleet.formats.model_spec import ModelSpec

from ..weights_loader import LayerWeights, ModelWeights
from .partition import TpPlan


def _own(t: torch.Tensor) -> torch.Tensor:
    # A copy, not a view: a rank must not keep the full tensor alive through its shard.
    return t.contiguous().clone()


def shard_layer(lw: LayerWeights, spec: ModelSpec, plan: TpPlan) -> LayerWeights:
    q_w, kv_w, inter = spec.q_width, spec.kv_width, spec.intermediate_size
    q, k, v = lw.qkv.split((q_w, kv_w, kv_w))  # [q, H], [kv, H], [kv, H]
    qkv = torch.cat([q[plan.q_cols], k[plan.kv_cols], v[plan.kv_cols]])  # [q/W + 2 kv_loc, H]
    bias = None
    if lw.qkv_bias is not None:
        qb, kb, vb = lw.qkv_bias.split((q_w, kv_w, kv_w))
        bias = _own(torch.cat([qb[plan.q_cols], kb[plan.kv_cols], vb[plan.kv_cols]]))
    gate, up = lw.gate_up.split((inter, inter))  # [I, H] each
    gate_up = torch.cat([gate[plan.inter_cols], up[plan.inter_cols]])  # [2 I/W, H]
    return LayerWeights(
        input_norm=_own(lw.input_norm),
        qkv=_own(qkv),
        qkv_bias=bias,
        o=_own(lw.o[:, plan.q_cols]),  # [H, q/W]
        post_norm=_own(lw.post_norm),
        gate_up=_own(gate_up),
        down=_own(lw.down[:, plan.inter_cols]),  # [H, I/W]
    )


def shard_model(weights: ModelWeights, spec: ModelSpec, plan: TpPlan) -> ModelWeights:
    """Rank plan.rank's weights; with world 1 an identical copy of the model."""
    _check_shapes(weights, spec)
    tied = weights.lm_head is weights.embed
    embed = _own(weights.embed)
    return ModelWeights(
        embed=embed,
        layers=[shard_layer(lw, spec, plan) for lw in weights.layers],
        final_norm=_own(weights.final_norm),
        lm_head=embed if tied else _own(weights.lm_head),
    )


def _check_shapes(weights: ModelWeights, spec: ModelSpec) -> None:
    H, I, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_width, spec.kv_width
    if len(weights.layers) != spec.num_layers:
        raise ValueError(f"weights have {len(weights.layers)} layers, the spec {spec.num_layers}")
    lw = weights.layers[0]
    for name, t, shape in (("qkv", lw.qkv, (q + 2 * kv, H)), ("o", lw.o, (H, q)),
                           ("gate_up", lw.gate_up, (2 * I, H)), ("down", lw.down, (H, I))):
        if tuple(t.shape) != shape:
            raise ValueError(f"layer weight {name} has shape {tuple(t.shape)}, the spec implies {shape}")

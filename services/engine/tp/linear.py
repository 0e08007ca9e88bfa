"""The decoder's linear layers with the LoRA part, on one device (world 1) or sharded over W ranks
under each of the LoRA schemes compared.

Shapes for rank i of W (T tokens, M fused modules, R the batch's largest rank, p = ceil(R/W))::

    column_parallel (q/k/v fused, gate/up fused; x replicated on every rank)
        y   = x @ W_loc^T                          [T, N_loc]       no collective
        slora:          u_loc = x @ A[i::W]^T      [T, M, p]
                        u = all_gather(u_loc)      [T, M, p*W]      the rank-sized intermediate
        replicated_a,
        gather_outputs: u = x @ A^T                [T, M, R]        no collective
        y[:, module cols] += scale * u @ B[out_cols]^T

    row_parallel (o, down; x_loc = this rank's input columns)
        y   = x_loc @ W_loc^T                      [T, H]           a partial sum
        slora, replicated_a:
                        u = all_reduce(x_loc @ A[:, in_cols]^T)      [T, 1, R] fp32
                        y[:, hidden_cols] += scale * u @ B[hidden_cols]^T   (into the partial sum:
                        the base all-reduce below then also assembles the LoRA output's columns)
        y = all_reduce(y)                          [T, H]           the base model's own all-reduce
        gather_outputs: x = all_gather(x_loc)      [T, in]          the full-width activation
                        y += scale * (x @ A^T) @ B^T   (whole adapter, the same on every rank)
        fused:          [y | u] = all_reduce([x_loc @ W_loc^T | x_loc @ A[:, in_cols]^T])  [T, H + R]
                        y += scale * u @ B^T       (whole B, the same on every rank): the LoRA
                        intermediate rides in the base model's all-reduce, no collective of its own

World 1 (one device, `collectives.single_rank()`): every collective is the identity and both
layers are y = x W^T plus shrink then expand into y, whatever the scheme (no rank pieces, no
widened all-reduce): the single-device engine's kernels and nothing more.

`lora` is a LoraStep (lora_step.py), or any object with its interface (the tests' plain-torch
TpLoraBatch); module groups are index tuples into LORA_MODULES.

NOTE: every rank must make the same collective calls in the same order: the decision to skip
the LoRA part depends only on the batch (identical on every rank), never on a rank's share. A
module group no adapter of the batch targets (in any layer) is skipped whole: no kernels, and no
LoRA collective (S1/S2 target q/k/v/o only, so gate/up and down cost nothing for LoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lora_step import LoraStep
from .collectives import TpComm
from .partition import TpPlan, piece_width
from .shard_adapters import Scheme


def column_parallel(
    x: torch.Tensor,  # [T, H] replicated
    weight: torch.Tensor,  # [N_loc, H]
    bias: torch.Tensor | None,  # [N_loc]
    layer: int,
    modules: tuple[int, ...],
    out_offsets: tuple[int, ...],  # each module's first column in the rank's fused output
    lora: LoraStep | None,
    comm: TpComm,
) -> torch.Tensor:
    """The rank's output columns [T, N_loc]."""
    y = F.linear(x, weight, bias)  # [T, N_loc]
    if lora is None or lora.empty or not lora.targets_any(modules):
        return y  # a group no adapter of the batch targets launches nothing (its kernels would only exit)
    if comm.world > 1 and lora.scheme.splits_column_rank:
        u_loc = lora.shrink(x, layer, modules, piece_width(lora.max_rank, comm.world))  # [T, M, p]
        u = comm.gather_rank_pieces(u_loc)  # [T, M, p*W]: rows past each adapter's rank are 0
    else:
        u = lora.shrink(x, layer, modules)  # [T, M, >= R]: whole A on this rank
    lora.expand(y, u, layer, modules, out_offsets)
    return y


def row_parallel(
    x_loc: torch.Tensor,  # [T, in/W] this rank's input columns
    weight: torch.Tensor,  # [H, in/W]
    layer: int,
    modules: tuple[int],  # the one module (o_proj or down_proj)
    plan: TpPlan,
    lora: LoraStep | None,
    comm: TpComm,
) -> torch.Tensor:
    """The full output [T, H], the same on every rank."""
    y = F.linear(x_loc, weight)  # [T, H] partial sum over this rank's input columns
    if lora is None or lora.empty or not lora.targets_any(modules):
        return comm.all_reduce_(y)
    if comm.world == 1:  # y is whole already, and so is the intermediate
        lora.expand(y, lora.shrink(x_loc, layer, modules), layer, modules, (0,))
        return comm.all_reduce_(y)
    R, scheme = lora.max_rank, lora.scheme
    if scheme == Scheme.FUSED:
        T, H = y.shape
        u_part = lora.shrink(x_loc, layer, modules, R, dtype=y.dtype).view(T, R)  # [T, R] partial
        both = comm.all_reduce_(torch.cat([y, u_part], dim=1))  # [T, H + R]: one collective
        y, u = both[:, :H], both[:, H:].view(T, 1, R)
        lora.expand(y, u, layer, modules, (0,))
        return y
    if scheme == Scheme.GATHER_OUTPUTS:
        comm.all_reduce_(y)
        x = comm.gather_columns(x_loc)  # [T, in]
        u = lora.shrink(x, layer, modules)  # [T, 1, >= R]
        lora.expand(y, u, layer, modules, (0,))
        return y
    # fp32: the partial intermediates are summed, and at [T, R] the extra bytes cost nothing.
    u = comm.all_reduce_(lora.shrink(x_loc, layer, modules, R, dtype=torch.float32))  # [T, 1, R]
    lora.expand(y, u, layer, modules, (plan.hidden_cols.start,))
    return comm.all_reduce_(y)

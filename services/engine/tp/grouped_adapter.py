"""How an adapter travels to the tensor-parallel ranks: packed once on the driver's host, grouped by
(module, rank), and cut into each rank's share on the rank's GPU with a few whole-group copies.

The driver packs (in the HostAdapterCache's threads, as the one-process engine packs its pages)
ONE flat buffer in the pool's dtype, groups in the order of their first target::

    flat = [group 0: A[l0], A[l1], ... ([r, in] each) | B[l0], B[l1], ... ([out, r] each) | group 1: ...]

so a group's A matrices are one [n, r, in] view and its B matrices one [n, out, r] view. Every rank
receives the same flat buffer (one broadcast per step) and slices its share of a whole group at
once (shard_adapters' A and B parts, batched over layers), instead of two slice copies per
(layer, module) target: a rank-64 q/k/v/o adapter of the 7B shape is 128 targets, ~20 copies here.

RankRunner.load_adapter (per target, from the full matrices) is the reference this is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import MODULE_INDEX, ModelSpec

from ..memory.adapter_pack import new_page_buffer
from .partition import TpPlan
from .shard_adapters import Scheme, ShardLayout, a_part, b_part, share_rows

Target = tuple[int, str, int, float]  # (layer, module, rank, scale): wire.AdapterLoad.targets


def targets_of(weights: LoraWeights) -> list[Target]:
    return [(t.layer, t.module, t.rank, t.scale) for t in weights.config.targets]


def group_targets(targets: list[Target]) -> list[tuple[str, int, list[int]]]:
    """(module, rank, layers) per group, in the order of each group's first target (rank 0: none)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for layer, module, rank, _ in targets:
        if rank > 0:
            groups.setdefault((module, rank), []).append(layer)
    return [(module, rank, layers) for (module, rank), layers in groups.items()]


def grouped_numel(spec: ModelSpec, targets: list[Target]) -> int:
    total = 0
    for module, rank, layers in group_targets(targets):
        in_f, out_f = spec.module_shape(module)
        total += len(layers) * rank * (in_f + out_f)
    return total


@dataclass(frozen=True)
class GroupedAdapter:
    """The packed host form the driver keeps (HostAdapterCache) and broadcasts to the ranks."""

    buf: torch.Tensor  # [grouped_numel] pool dtype, host
    targets: list[Target]
    ranks_by_module: dict[str, int]

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


def pack_grouped(weights: LoraWeights, spec: ModelSpec, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> GroupedAdapter:
    """One cat into `out` (or a fresh buffer advised huge pages): it casts as it copies."""
    targets = targets_of(weights)
    n = grouped_numel(spec, targets)
    if out is None:
        out = new_page_buffer((n,), dtype)
    elif out.shape != (n,) or out.dtype != dtype:
        raise ValueError(f"out must be [{n}] {dtype}, got {tuple(out.shape)} {out.dtype}")
    parts = []
    for module, _, layers in group_targets(targets):
        parts += [weights.a[(layer, module)].reshape(-1) for layer in layers]
        parts += [weights.b[(layer, module)].reshape(-1) for layer in layers]
    if parts:
        torch.cat(parts, out=out)
    return GroupedAdapter(out, targets, weights.config.ranks_by_module())


class GroupedPacker:
    """HostAdapterCache's packer for the TP driver (adapter_pack.PagePacker's interface)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype

    def shape(self, weights: LoraWeights) -> tuple[int]:
        return (grouped_numel(self.spec, targets_of(weights)),)

    def pack(self, weights: LoraWeights, out: torch.Tensor | None) -> GroupedAdapter:
        return pack_grouped(weights, self.spec, self.dtype, out=out)


def write_share(buf: torch.Tensor, flat: torch.Tensor, targets: list[Target], spec: ModelSpec, plan: TpPlan,
                scheme: Scheme, layout: ShardLayout) -> None:
    """This rank's share of the grouped adapter `flat` into `buf: [L, n_pages * P]` (zeroed), laid
    out as `layout` says: per group one copy for the A shares of all its layers, one for the B^T."""
    pos = 0
    for module, rank, layers in group_targets(targets):
        in_f, out_f = spec.module_shape(module)
        n, m = len(layers), MODULE_INDEX[module]
        a = flat[pos : pos + n * rank * in_f].view(n, rank, in_f)
        pos += n * rank * in_f
        b = flat[pos : pos + n * out_f * rank].view(n, out_f, rank)
        pos += n * out_f * rank
        _put(buf, layers, layout.a_off[m], a_part(a, module, plan, scheme))  # [n, a_rows, a_cols]
        _put(buf, layers, layout.b_off[m], b_part(b, module, plan, scheme).transpose(1, 2))  # [n, r, out_loc]


def _put(buf: torch.Tensor, layers: list[int], off: int, x: torch.Tensor) -> None:
    # x: [n, rows, cols] -> buf[layer, off : off + rows * cols] row-major, for each of the n layers
    n, rows, cols = x.shape
    if rows * cols == 0:
        return
    region = buf[:, off : off + rows * cols]  # [L, rows * cols] view
    if layers == list(range(buf.shape[0])):  # the usual case: every layer, one rank
        region.view(-1, rows, cols).copy_(x)
    else:  # some layers only (layers_to_transform) or per-layer ranks (rank_pattern)
        region[torch.tensor(layers, dtype=torch.long, device=buf.device)] = x.reshape(n, -1).to(buf.dtype)


def share_entries(targets: list[Target], plan: TpPlan, scheme: Scheme) -> list[tuple[int, str, int, int, float]]:
    """RankAdapterTables.set_slot's entries: (layer, module, A share rows, full rank, scale)."""
    return [(layer, module, share_rows(module, rank, plan, scheme), rank, scale)
            for layer, module, rank, scale in targets]

"""What one tensor-parallel rank of the engine holds and does: its model shard, its pool, its adapter shares.

The driver (rank 0) and every worker rank own one RankRunner each and feed it the same messages
in the same order: adapter loads (slot, pages, full adapter tensors) and forward steps.

    pool: [L, num_pages, P_loc]      P_loc = 2 * block_size * kv_loc * head_dim (the rank's KV heads)

Page ids and slots are the driver's (one allocator, one AdapterCache): the same on every rank.
An adapter's share on this rank is written into ITS pages with the rank's ShardLayout (per-layer
virtual buffer: A share [a_rows, a_cols] row-major, B share transposed [r, out_loc]), exactly the
format of memory/layout.py with the rank's shapes. Each step reads the shares of the batch's
adapters back out of the pool (so what runs is what the pages hold: a page reused by KV after an
eviction can never be read as an adapter, because evicted slots are never in a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.peft_config import PeftLoraConfig, TargetEntry
from ..adapters.weights import LoraWeights
from ..model_spec import MODULE_INDEX, ModelSpec
from ..ops.base import AttentionMeta, AttentionOps
from ..weights_loader import ModelWeights
from .collectives import TpComm
from .lora_math import TpLoraBatch
from .model import TpLlamaModel
from .partition import TpPlan, make_plan
from .shard_adapters import LoraShard, Scheme, ShardLayout, shard_lora


@dataclass(frozen=True)
class _ShareEntry:
    layer: int
    module: str
    rank: int  # the adapter's full rank of this module in this layer
    scale: float
    a_off: int
    a_shape: tuple[int, int]  # this rank's A share
    b_off: int
    bt_shape: tuple[int, int]  # this rank's B share, transposed: [r, out_loc]


@dataclass(frozen=True)
class _SlotShare:
    pages: torch.Tensor  # [n] int64 page ids (the driver's)
    entries: tuple[_ShareEntry, ...]


def adapter_pages(spec: ModelSpec, ranks_by_module: dict[str, int], world: int, scheme: Scheme,
                  page_elems: int) -> int:
    """Pages one adapter takes on EVERY rank: the busiest rank's share decides (page ids are shared)."""
    return max(ShardLayout.build(spec, ranks_by_module, make_plan(spec, world, r), scheme).num_pages(page_elems)
               for r in range(world))


class RankRunner:
    def __init__(self, spec: ModelSpec, plan: TpPlan, weights: ModelWeights, attn_ops: AttentionOps, comm: TpComm,
                 pool: torch.Tensor, scheme: Scheme):
        self.spec, self.plan, self.scheme = spec, plan, Scheme(scheme)
        self.pool = pool  # [L, num_pages, P_loc]
        self.model = TpLlamaModel(spec, plan, weights, attn_ops, comm)
        self._slots: dict[int, _SlotShare] = {}

    # --- adapters --------------------------------------------------------------------------
    def load_adapter(self, slot: int, pages: list[int], ranks_by_module: dict[str, int],
                     targets: list[TargetEntry], a: dict, b: dict) -> None:
        """Write this rank's share of a full adapter (a[(l, m)]: [r, in], b: [out, r]) into `pages`."""
        layout = ShardLayout.build(self.spec, ranks_by_module, self.plan, self.scheme)
        P, L = self.pool.shape[2], self.spec.num_layers
        if layout.num_pages(P) > len(pages):
            raise ValueError(f"adapter share needs {layout.num_pages(P)} pages, the driver gave {len(pages)}")
        # rank / alpha of the config are not read by shard_lora: the targets carry each module's rank and scale.
        full = LoraWeights(PeftLoraConfig(0, 0.0, False, tuple(targets)), a, b)
        share = shard_lora(full, self.plan, self.scheme)
        buf = torch.zeros(L, len(pages) * P, dtype=self.pool.dtype)  # [L, n * P]: every layer's virtual buffer
        entries = []
        for t in targets:
            key, m = (t.layer, t.module), MODULE_INDEX[t.module]
            a_sh, bt_sh = share.a[key], share.b[key].t()  # [a_rows, a_cols], [r, out_loc]
            a_off, b_off = layout.a_off[m], layout.b_off[m]
            buf[t.layer, a_off : a_off + a_sh.numel()] = a_sh.reshape(-1).to(self.pool.dtype)
            buf[t.layer, b_off : b_off + bt_sh.numel()] = bt_sh.reshape(-1).to(self.pool.dtype)
            entries.append(_ShareEntry(t.layer, t.module, t.rank, t.scale, a_off, tuple(a_sh.shape), b_off,
                                       tuple(bt_sh.shape)))
        page_ids = torch.tensor(pages, dtype=torch.long, device=self.pool.device)
        self.pool[:, page_ids] = buf.view(L, len(pages), P).to(self.pool.device)
        self._slots[slot] = _SlotShare(page_ids, tuple(entries))  # a reused slot is overwritten

    def _read_share(self, slot: int) -> LoraShard:
        """The slot's share as LoraShard views into a gather of its pages."""
        s = self._slots[slot]
        L = self.spec.num_layers
        buf = self.pool[:, s.pages].reshape(L, -1)  # [L, n * P_loc]
        a, b, ranks, scales = {}, {}, {}, {}
        for e in s.entries:
            key = (e.layer, e.module)
            a[key] = buf[e.layer, e.a_off : e.a_off + e.a_shape[0] * e.a_shape[1]].view(e.a_shape)
            b[key] = buf[e.layer, e.b_off : e.b_off + e.bt_shape[0] * e.bt_shape[1]].view(e.bt_shape).t()
            ranks[key], scales[key] = e.rank, e.scale
        return LoraShard(self.scheme, a, b, ranks, scales)

    # --- the step ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMeta,
                token_slot: torch.Tensor | None) -> torch.Tensor:
        """token_slot: [T] driver slots (-1: base only) or None -> hidden [T, H], the same on every rank."""
        lora = None
        if token_slot is not None:
            used = sorted(set(token_slot.tolist()) - {-1})
            index = {slot: i for i, slot in enumerate(used)}
            token_adapter = torch.tensor([index.get(s, -1) for s in token_slot.tolist()], dtype=torch.int64,
                                         device=input_ids.device)
            lora = TpLoraBatch(token_adapter, [self._read_share(s) for s in used])
        return self.model.forward(input_ids, positions, self.pool, attn, lora)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

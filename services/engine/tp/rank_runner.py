"""What one tensor-parallel rank of the engine holds and does: its model shard, its pool, its adapter shares.

The driver (rank 0) and every worker rank own one RankRunner each and feed it the same messages
in the same order: adapter loads (slot, pages, full adapter tensors) and forward steps.

    pool: [L, num_pages, P_loc]      P_loc = 2 * block_size * kv_loc * head_dim (the rank's KV heads)

Page ids and slots are the driver's (one allocator, one AdapterCache): the same on every rank.
An adapter's share on this rank is written into ITS pages with the rank's ShardLayout (per-layer
virtual buffer: A share [a_rows, a_cols] row-major, B share transposed [r, out_loc]), exactly the
format of memory/layout.py with the rank's shapes, and the engine's LoraOps (Triton on CUDA)
read it from there with rank-local tables (rank_tables.py): what runs is what the pages hold, and
no step copies a share (a page reused by KV after an eviction is never read as an adapter,
because evicted slots are never in a batch; a reused slot's table rows are rewritten by its load).
"""

from __future__ import annotations

import torch

from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import MODULE_INDEX, ModelSpec
from lorafleet.formats.peft_config import PeftLoraConfig, TargetEntry

from ..model import ElementwiseOps, LlamaModel, TensorParallel
from ..ops.base import AttentionMeta, AttentionOps, LoraBatch, LoraOps
from ..ops.torch_ref import TorchLoraOps
from ..weights_loader import ModelWeights
from .collectives import TpComm
from .grouped_adapter import Target, share_entries, write_share
from .partition import TpPlan, make_plan
from .rank_tables import RankAdapterTables
from .shard_adapters import Scheme, ShardLayout, shard_lora


def adapter_pages(spec: ModelSpec, ranks_by_module: dict[str, int], world: int, scheme: Scheme,
                  page_elems: int) -> int:
    """Pages one adapter takes on EVERY rank: the busiest rank's share decides (page ids are shared)."""
    return max(ShardLayout.build(spec, ranks_by_module, make_plan(spec, world, r), scheme).num_pages(page_elems)
               for r in range(world))


class RankRunner:
    def __init__(self, spec: ModelSpec, plan: TpPlan, weights: ModelWeights, attn_ops: AttentionOps, comm: TpComm,
                 pool: torch.Tensor, scheme: Scheme, lora_ops: tuple[LoraOps, LoraOps] | None = None,
                 elementwise_ops: ElementwiseOps | None = None, slots: int = 64, max_pages: int = 1):  # fmt: skip
        """lora_ops: (shrink ops, expand ops), two instances so that each caches its own table checks
        under slora; default: the torch reference ops. slots, max_pages: the tables' first capacity."""
        self.spec, self.plan, self.scheme = spec, plan, Scheme(scheme)
        self.pool = pool  # [L, num_pages, P_loc]
        self.model = LlamaModel(spec, weights, attn_ops, elementwise_ops, TensorParallel(plan, comm))
        self.tables = RankAdapterTables(spec, plan, self.scheme, pool.device, slots, max_pages)
        self.shrink_ops, self.expand_ops = lora_ops or (TorchLoraOps(), TorchLoraOps())

    # --- adapters --------------------------------------------------------------------------
    def load_adapter(self, slot: int, pages: list[int], ranks_by_module: dict[str, int],
                     targets: list[TargetEntry], a: dict, b: dict) -> None:
        """Write this rank's share of a full adapter (a[(l, m)]: [r, in], b: [out, r]) into `pages`,
        target by target: the reference load_grouped (what the engine runs) is tested against."""
        layout = ShardLayout.build(self.spec, ranks_by_module, self.plan, self.scheme)
        P, L = self.pool.shape[2], self.spec.num_layers
        if layout.num_pages(P) > len(pages):
            raise ValueError(f"adapter share needs {layout.num_pages(P)} pages, the driver gave {len(pages)}")
        # rank / alpha of the config are not read by shard_lora: the targets carry each module's rank and scale.
        full = LoraWeights(PeftLoraConfig(0, 0.0, False, tuple(targets)), a, b)
        share = shard_lora(full, self.plan, self.scheme)
        # [L, n * P]: every layer's virtual buffer, built on the pool's device (the shares are there)
        buf = torch.zeros(L, len(pages) * P, dtype=self.pool.dtype, device=self.pool.device)
        entries = []
        for t in targets:
            key, m = (t.layer, t.module), MODULE_INDEX[t.module]
            a_sh, bt_sh = share.a[key], share.b[key].t()  # [a_rows, a_cols], [r, out_loc]
            a_off, b_off = layout.a_off[m], layout.b_off[m]
            buf[t.layer, a_off : a_off + a_sh.numel()] = a_sh.reshape(-1).to(self.pool.dtype)
            buf[t.layer, b_off : b_off + bt_sh.numel()] = bt_sh.reshape(-1).to(self.pool.dtype)
            entries.append((t.layer, t.module, a_sh.shape[0], t.rank, t.scale))
        page_ids = torch.tensor(pages, dtype=torch.long, device=self.pool.device)
        self.pool[:, page_ids] = buf.view(L, len(pages), P)
        self.tables.set_slot(slot, pages, layout, entries)  # a reused slot's rows are rewritten

    def load_grouped(self, slot: int, pages: list[int], ranks_by_module: dict[str, int], targets: list[Target],
                     flat: torch.Tensor) -> None:
        """As load_adapter, from the grouped flat form every rank receives (grouped_adapter.py):
        a few whole-group copies on the pool's device instead of two per target."""
        layout = ShardLayout.build(self.spec, ranks_by_module, self.plan, self.scheme)
        P, L = self.pool.shape[2], self.spec.num_layers
        if layout.num_pages(P) > len(pages):
            raise ValueError(f"adapter share needs {layout.num_pages(P)} pages, the driver gave {len(pages)}")
        buf = torch.zeros(L, len(pages) * P, dtype=self.pool.dtype, device=self.pool.device)  # [L, n * P]
        write_share(buf, flat, targets, self.spec, self.plan, self.scheme, layout)
        page_ids = torch.tensor(pages, dtype=torch.long, device=self.pool.device)
        self.pool[:, page_ids] = buf.view(L, len(pages), P)
        self.tables.set_slot(slot, pages, layout, share_entries(targets, self.plan, self.scheme))

    # --- the step ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMeta,
                lora: LoraBatch | None) -> torch.Tensor:
        """lora: the step's segments (driver slots) and the modules its adapters target (the
        header's, wire.unpack_ints), or None -> hidden [T, H], the same on every rank."""
        step = None
        if lora is not None:
            if lora.targets is None:
                raise ValueError("a rank's LoRA batch needs the step's targets (wire.unpack_ints sets them)")
            step = self.tables.lora_step(self.pool, lora, self.shrink_ops, self.expand_ops)
        return self.model.forward(input_ids, positions, self.pool, attn, step)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

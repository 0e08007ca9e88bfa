"""One rank's slot tables: where each adapter's share on this rank sits in the rank's pool pages.

A rank's share of an adapter sits in its pages in the format of memory/layout.py with the rank's
shapes (ShardLayout), so the single-device LoraOps read it given rank-local tables:

    module_shapes[m] = (a_cols, b_cols) of the share     e.g. fused o_proj: (q/W, H), q_proj: (H, q/W)
    shrink tables: ranks[s, l, m] = rows of the A share  (slora column-parallel: ceil((r-i)/W))
    expand tables: ranks[s, l, m] = the adapter's rank r (B^T share is [r, b_cols])

Under slora the two rank tables differ (A holds strided rank rows, B all r of them), so shrink
and expand get their own tables (and their own ops instance, whose per-tables checks are cached);
under the other schemes they are one object. Slots and page ids are the driver's. A step's LoRA
on the rank is a LoraStep (lora_step.py) over these tables: no per-step copy of the shares.
"""

from __future__ import annotations

import torch

from lorafleet.formats.model_spec import LORA_MODULES, MODULE_INDEX, ModelSpec

from ..lora_step import LoraStep
from ..ops.base import AdapterTables, LoraBatch, LoraOps
from .partition import TpPlan
from .shard_adapters import Scheme, ShardLayout


def share_module_shapes(spec: ModelSpec, plan: TpPlan, scheme: Scheme) -> tuple[tuple[int, int], ...]:
    """(a_cols, b_cols) of this rank's share of each of the 7 modules (independent of the rank r)."""
    probe = ShardLayout.build(spec, {m: 1 for m in LORA_MODULES}, plan, scheme)
    return tuple((a[1], b[1]) for a, b in zip(probe.a_shape, probe.b_shape))


class RankAdapterTables:
    """Device tables of the slots this rank holds; rows rewritten by each load, grown on demand."""

    def __init__(self, spec: ModelSpec, plan: TpPlan, scheme: Scheme, device: torch.device, slots: int = 64,
                 max_pages: int = 1):
        self.scheme, self.device, self.L = Scheme(scheme), device, spec.num_layers
        self.module_shapes = share_module_shapes(spec, plan, self.scheme)
        self.split = self.scheme.splits_column_rank
        self._alloc(slots, max_pages)  # grown on demand, except under CUDA graphs (sized to the driver's capacity)
        self.max_rank: dict[int, int] = {}  # slot -> the adapter's largest full rank
        self.modules: dict[int, frozenset[str]] = {}  # slot -> the modules it targets (any layer)

    def _alloc(self, slots: int, max_pages: int) -> None:
        old = getattr(self, "expand_tables", None)
        expand = AdapterTables.zeros(slots, max_pages, self.L, self.module_shapes, self.device)
        if old is not None:  # keep the resident slots' rows
            s0, p0 = old.page_table.shape
            expand.page_table[:s0, :p0] = old.page_table
            for name in ("ranks", "scales", "a_off", "b_off"):
                getattr(expand, name)[:s0] = getattr(old, name)
        # The ops' tables: new objects with the tensors (a new object is validated again by the kernels).
        # Under slora shrink reads the A share's rows as its ranks; otherwise both are one object.
        shrink = expand
        if self.split:
            a_rows = torch.zeros(slots, self.L, len(LORA_MODULES), dtype=torch.int32, device=self.device)
            if old is not None:
                a_rows[:s0] = self.shrink_tables.ranks
            shrink = AdapterTables(expand.page_table, a_rows, expand.scales, expand.a_off, expand.b_off,
                                   self.module_shapes)
        self.expand_tables, self.shrink_tables = expand, shrink

    def set_slot(self, slot: int, pages: list[int], layout: ShardLayout,
                 entries: list[tuple[int, str, int, int, float]]) -> None:
        """entries: (layer, module, A share rows, full rank r, scale) per target."""
        S, P = self.expand_tables.page_table.shape
        if slot >= S or len(pages) > P:
            self._alloc(max(S, 2 * slot + 2) if slot >= S else S, max(P, len(pages)))
        t = self.expand_tables
        t.page_table[slot].zero_()
        t.page_table[slot, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        rows = torch.zeros(self.L, 7, dtype=torch.int32)
        ranks = torch.zeros(self.L, 7, dtype=torch.int32)
        scales = torch.zeros(self.L, 7, dtype=torch.float32)
        for layer, module, a_rows, r, scale in entries:
            m = MODULE_INDEX[module]
            rows[layer, m], ranks[layer, m], scales[layer, m] = a_rows, r, scale
        t.ranks[slot], t.scales[slot] = ranks, scales
        if self.split:
            self.shrink_tables.ranks[slot] = rows
        t.a_off[slot] = torch.tensor(layout.a_off, dtype=torch.int64)
        t.b_off[slot] = torch.tensor(layout.b_off, dtype=torch.int64)
        self.max_rank[slot] = max((e[3] for e in entries), default=0)
        self.modules[slot] = frozenset(e[1] for e in entries if e[3] > 0)

    def lora_step(self, pool: torch.Tensor, batch: LoraBatch, shrink_ops: LoraOps, expand_ops: LoraOps) -> LoraStep:
        """The step's LoRA on this rank over these tables (batch: driver slots, targets set)."""
        return LoraStep(pool, self.shrink_tables, self.expand_tables, batch, shrink_ops, expand_ops, self.scheme)

    def batch_of(self, token_slot: torch.Tensor) -> LoraBatch:
        """token_slot: [T] int32 driver slots (-1: base only) -> the LoraBatch of their segments,
        with the max rank and targets of the slots (the driver sends these; tests build them here)."""
        starts, lens, slots = segments(token_slot.tolist())
        dev = token_slot.device

        def i32(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int32).to(dev, non_blocking=True)

        return LoraBatch(token_slot=token_slot, seg_start=i32(starts), seg_len=i32(lens), seg_slot=i32(slots),
                         max_rank=max((self.max_rank[s] for s in set(slots)), default=0),
                         max_seg_len=max(lens, default=0), num_segments=len(slots),
                         targets=frozenset().union(*(self.modules[s] for s in set(slots))))


def segments(token_slot: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Runs of one slot among tokens that have an adapter: (starts, lengths, slots)."""
    starts, lens, slots = [], [], []
    for t, s in enumerate(token_slot):
        if s < 0:
            continue
        if slots and s == slots[-1] and starts[-1] + lens[-1] == t:
            lens[-1] += 1
        else:
            starts.append(t), lens.append(1), slots.append(s)
    return starts, lens, slots

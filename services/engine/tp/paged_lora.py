"""LoRA on one rank's adapter shares straight from its pool pages, with the engine's LoraOps
(Triton kernels on CUDA, the torch reference ops on the CPU): no per-step copy of the shares.

A rank's share of an adapter sits in its pages in the format of memory/layout.py with the rank's
shapes (ShardLayout), so the single-GPU ops read it given rank-local tables:

    module_shapes[m] = (a_cols, b_cols) of the share     e.g. fused o_proj: (q/W, H), q_proj: (H, q/W)
    shrink tables: ranks[s, l, m] = rows of the A share  (slora column-parallel: ceil((r-i)/W))
    expand tables: ranks[s, l, m] = the adapter's rank r (B^T share is [r, b_cols])

Under slora the two rank tables differ (A holds strided rank rows, B all r of them), so shrink
and expand get their own tables (and their own ops instance, whose per-tables checks are cached);
under the other schemes they are one object. Slots and page ids are the driver's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.formats.model_spec import LORA_MODULES, MODULE_INDEX, ModelSpec

from ..ops.base import AdapterTables, LoraBatch, LoraContext, LoraOps
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
        old = getattr(self, "page_table", None)
        S, L, dev = slots, self.L, self.device
        new = dict(page_table=torch.zeros(S, max_pages, dtype=torch.int32, device=dev),
                   a_rows=torch.zeros(S, L, 7, dtype=torch.int32, device=dev),
                   ranks=torch.zeros(S, L, 7, dtype=torch.int32, device=dev),
                   scales=torch.zeros(S, L, 7, dtype=torch.float32, device=dev),
                   a_off=torch.zeros(S, 7, dtype=torch.int64, device=dev),
                   b_off=torch.zeros(S, 7, dtype=torch.int64, device=dev))
        if old is not None:  # keep the resident slots' rows
            s0, p0 = old.shape
            new["page_table"][:s0, :p0] = old
            for name in ("a_rows", "ranks", "scales", "a_off", "b_off"):
                new[name][:s0] = getattr(self, name)
        for name, t in new.items():
            setattr(self, name, t)
        # The ops' contexts: rebuilt with the tensors (a new object is validated again by the kernels).
        self.expand_tables = AdapterTables(self.page_table, self.ranks, self.scales, self.a_off, self.b_off,
                                           self.module_shapes)
        self.shrink_tables = (AdapterTables(self.page_table, self.a_rows, self.scales, self.a_off, self.b_off,
                                            self.module_shapes) if self.split else self.expand_tables)

    def set_slot(self, slot: int, pages: list[int], layout: ShardLayout,
                 entries: list[tuple[int, str, int, int, float]]) -> None:
        """entries: (layer, module, A share rows, full rank r, scale) per target."""
        S, P = self.page_table.shape
        if slot >= S or len(pages) > P:
            self._alloc(max(S, 2 * slot + 2) if slot >= S else S, max(P, len(pages)))
        self.page_table[slot].zero_()
        self.page_table[slot, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        rows = torch.zeros(self.L, 7, dtype=torch.int32)
        ranks = torch.zeros(self.L, 7, dtype=torch.int32)
        scales = torch.zeros(self.L, 7, dtype=torch.float32)
        for layer, module, a_rows, r, scale in entries:
            m = MODULE_INDEX[module]
            rows[layer, m], ranks[layer, m], scales[layer, m] = a_rows, r, scale
        self.a_rows[slot], self.ranks[slot], self.scales[slot] = rows, ranks, scales
        self.a_off[slot] = torch.tensor(layout.a_off, dtype=torch.int64)
        self.b_off[slot] = torch.tensor(layout.b_off, dtype=torch.int64)
        self.max_rank[slot] = max((e[3] for e in entries), default=0)
        self.modules[slot] = frozenset(e[1] for e in entries if e[3] > 0)


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


@dataclass
class PagedLoraBatch:
    """The step's LoRA over pages; the TpLoraBatch interface linear.py uses (same on every rank)."""

    scheme: Scheme
    pool: torch.Tensor  # [L, num_pages, P_loc]
    tables: RankAdapterTables
    batch: LoraBatch
    shrink_ops: LoraOps
    expand_ops: LoraOps
    targets: frozenset[str] = frozenset()  # modules any adapter of the batch targets (same on every rank)

    @classmethod
    def build(cls, token_slot: torch.Tensor, pool: torch.Tensor, tables: RankAdapterTables,
              shrink_ops: LoraOps, expand_ops: LoraOps) -> "PagedLoraBatch":
        """token_slot: [T] int32 driver slots (-1: base only)."""
        starts, lens, slots = segments(token_slot.tolist())
        dev = pool.device

        def i32(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int32).to(dev, non_blocking=True)

        max_rank = max((tables.max_rank[s] for s in set(slots)), default=0)
        batch = LoraBatch(token_slot=token_slot, seg_start=i32(starts), seg_len=i32(lens), seg_slot=i32(slots),
                          max_rank=max_rank, max_seg_len=max(lens, default=0), num_segments=len(slots))
        targets = frozenset().union(*(tables.modules[s] for s in set(slots)))
        return cls(tables.scheme, pool, tables, batch, shrink_ops, expand_ops, targets)

    @property
    def empty(self) -> bool:
        return self.batch.empty

    @property
    def max_rank(self) -> int:
        return self.batch.max_rank

    def shrink(self, x: torch.Tensor, layer: int, modules: tuple[str, ...], width: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: [T, K] -> u: [T, len(modules), width]; the ops give [T, M, R], R >= width."""
        ctx = LoraContext(self.pool, self.tables.shrink_tables, self.batch)
        u = self.shrink_ops.shrink(x.contiguous(), layer, tuple(MODULE_INDEX[m] for m in modules), ctx)
        if u.shape[2] != width:  # slora's column pieces: rows past p = ceil(R/W) are zero
            u = u[:, :, :width].contiguous() if u.shape[2] > width else torch.nn.functional.pad(u, (0, width - u.shape[2]))
        return u if dtype is None else u.to(dtype)

    def expand(self, y: torch.Tensor, u: torch.Tensor, layer: int, modules: tuple[str, ...],
               out_offsets: tuple[int, ...]) -> None:
        """y[:, off_i : off_i + b_cols_i] += scale * u[:, i, :r] @ B_i^T, in place (y: unit stride)."""
        ctx = LoraContext(self.pool, self.tables.expand_tables, self.batch)
        # u: y's dtype or float32 (split-K shrink, slora's fp32 reduce); the ops round it to y's dtype.
        u = u if u.dtype in (y.dtype, torch.float32) else u.to(y.dtype)
        self.expand_ops.expand(y, u.contiguous(), layer, tuple(MODULE_INDEX[m] for m in modules),
                               tuple(out_offsets), ctx)

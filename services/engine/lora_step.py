"""A step's LoRA as the decoder's projections use it, on one device or on one tensor-parallel rank.

The decoder (model.py, through tp/linear.py) asks for two things per projection: `shrink` (x
times every token's A) and `expand` (the intermediate times B, added into the projection's output
columns). A LoraStep answers both with the engine's LoraOps (Triton on CUDA, the torch reference
on the CPU) reading adapters straight from the pool's pages through slot tables:

    one device          tables: the AdapterCache's (one object for shrink and expand), ops: the
                        engine's LoraOps, scheme irrelevant (world 1: no collective either way)
    rank i of W         tables: the rank's (tp/rank_tables.py: the same format with the rank's
                        share shapes; under slora shrink and expand read different rank tables),
                        ops: two instances (each caches the checks of its own tables)

Module groups are index tuples into LORA_MODULES (the ops' form); `targets_any` takes the group's
names. Built once per step (a graph builds one per captured key); the ops' contexts are made here
once, not per call: the Triton ops cache their checks and work lists by object identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch

from lorafleet.formats.model_spec import LORA_MODULES

from .ops.base import AdapterTables, LoraBatch, LoraContext, LoraOps
from .tp.shard_adapters import Scheme


@cache
def group_names(modules: tuple[int, ...]) -> frozenset[str]:
    """The LORA_MODULES names of a module group given by indices."""
    return frozenset(LORA_MODULES[m] for m in modules)


@dataclass
class LoraStep:
    pool: torch.Tensor  # [L, num_pages, P] (a rank's pool under TP: P is its page size)
    shrink_tables: AdapterTables
    expand_tables: AdapterTables
    batch: LoraBatch  # targets known on the host (build_batch / the TP step header set them)
    shrink_ops: LoraOps
    expand_ops: LoraOps
    scheme: Scheme = Scheme.FUSED  # how the adapters were sharded (only read at world > 1)
    shrink_ctx: LoraContext = field(init=False, repr=False)
    expand_ctx: LoraContext = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch.targets is None:
            raise ValueError("a LoraStep needs the batch's targets (the modules its adapters target)")
        self.shrink_ctx = LoraContext(self.pool, self.shrink_tables, self.batch)
        same = self.expand_tables is self.shrink_tables
        self.expand_ctx = self.shrink_ctx if same else LoraContext(self.pool, self.expand_tables, self.batch)

    @classmethod
    def one_device(cls, pool: torch.Tensor, tables: AdapterTables, batch: LoraBatch, ops: LoraOps) -> "LoraStep":
        return cls(pool, tables, tables, batch, ops, ops)

    @property
    def empty(self) -> bool:
        return self.batch.empty

    @property
    def max_rank(self) -> int:
        return self.batch.max_rank

    def targets_any(self, modules: tuple[int, ...]) -> bool:
        """Does any adapter of the step target a module of this group (in any layer)?"""
        return self.batch.targets_any(group_names(modules))

    def shrink(self, x: torch.Tensor, layer: int, modules: tuple[int, ...], width: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: [T, K] -> u: [T, len(modules), R'] (x's dtype or float32, see LoraOps.shrink).

        width: R' exactly (slora's rank pieces and fused's all-reduce need it; columns past the
        ops' own width are zero); None: the ops' width (>= every rank of the step), no copy.
        dtype: u cast to it (None: as the ops give it)."""
        u = self.shrink_ops.shrink(x.contiguous(), layer, modules, self.shrink_ctx)
        if width is not None and u.shape[2] != width:
            u = u[:, :, :width].contiguous() if u.shape[2] > width else torch.nn.functional.pad(u, (0, width - u.shape[2]))
        return u if dtype is None else u.to(dtype)  # (contiguous() and to() return u itself when it already is)

    def expand(self, y: torch.Tensor, u: torch.Tensor, layer: int, modules: tuple[int, ...],
               out_offsets: tuple[int, ...]) -> None:
        """y[:, off_i : off_i + b_cols_i] += scale * u[:, i, :r] @ B_i^T, in place (y: unit stride)."""
        # u: y's dtype or float32 (split-K shrink, slora's fp32 reduce); the ops round it to y's dtype.
        u = u if u.dtype in (y.dtype, torch.float32) else u.to(y.dtype)
        self.expand_ops.expand(y, u.contiguous(), layer, modules, out_offsets,
                               self.expand_ctx)

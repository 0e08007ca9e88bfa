"""The interface every op implementation (torch reference, Triton) provides, and its metadata.

The engine builds the metadata once per step; every layer reuses it. All tensors live on the
pool's device. Token order in a step: decode tokens first (one per sequence), then prefill
chunks; within each part requests are grouped by adapter so LoRA segments are long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AdapterTables:
    """Device tables of the adapters resident in the pool, indexed by slot (slot != adapter id).

    Owned by the AdapterCache; kernels only read them.
    """

    page_table: torch.Tensor  # [S, max_pages] int32: page ids of the slot's virtual buffer
    ranks: torch.Tensor  # [S, L, 7] int32: rank of module m in layer l (0: not targeted)
    scales: torch.Tensor  # [S, L, 7] float32: PEFT scaling of module m in layer l
    a_off: torch.Tensor  # [S, 7] int64: element offset of A_m ([r, in] row-major) in the layer buffer
    b_off: torch.Tensor  # [S, 7] int64: element offset of B_m^T ([r, out] row-major)
    module_shapes: tuple[tuple[int, int], ...]  # [7] (in_features, out_features) of each module

    @classmethod
    def zeros(cls, slots: int, max_pages: int, layers: int, module_shapes: tuple[tuple[int, int], ...],
              device: torch.device) -> "AdapterTables":
        """Tables of `slots` empty slots (rank 0 everywhere: no slot targets anything yet)."""
        M = len(module_shapes)
        return cls(page_table=torch.zeros(slots, max_pages, dtype=torch.int32, device=device),
                   ranks=torch.zeros(slots, layers, M, dtype=torch.int32, device=device),
                   scales=torch.zeros(slots, layers, M, dtype=torch.float32, device=device),
                   a_off=torch.zeros(slots, M, dtype=torch.int64, device=device),
                   b_off=torch.zeros(slots, M, dtype=torch.int64, device=device),
                   module_shapes=module_shapes)


@dataclass
class LoraBatch:
    """Which adapter each token of the step uses.

    NOTE: segments cover only tokens that have an adapter; tokens of base-only requests appear in
    no segment, so kernels launched over segments skip them at no cost.
    """

    token_slot: torch.Tensor  # [T] int32: adapter slot of each token, -1 for none
    seg_start: torch.Tensor  # [G] int32: first token of each segment (run of one slot)
    seg_len: torch.Tensor  # [G] int32
    seg_slot: torch.Tensor  # [G] int32
    max_rank: int  # largest rank of any module of any adapter in the batch (0: no adapter)
    max_seg_len: int  # python int, for grid sizing
    num_segments: int  # python int (== G)
    # Modules (LORA_MODULES names) any adapter of the batch targets, known on the host; None: any
    # may be. A module group outside it launches no LoRA kernel.
    targets: frozenset[str] | None = None

    def targets_any(self, modules: frozenset[str]) -> bool:
        return self.targets is None or not self.targets.isdisjoint(modules)

    @property
    def empty(self) -> bool:
        return self.num_segments == 0


@dataclass
class LoraContext:
    pool: torch.Tensor  # [L, num_pages, P]
    tables: AdapterTables
    batch: LoraBatch


@dataclass
class AttentionMeta:
    """Paged attention metadata for one step (sequences in batch order: decodes first)."""

    query_start: torch.Tensor  # [B+1] int32: cumulative query lengths (new tokens per sequence)
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached prefix + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] int32: page id of each KV block (-1 past the end)
    slot_mapping: torch.Tensor  # [T] int64: page * block_size + offset where each new token's K/V go
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class LoraOps(Protocol):
    def shrink(self, x: torch.Tensor, layer: int, modules: tuple[int, ...], ctx: LoraContext) -> torch.Tensor:
        """u[t, i, :r] = x[t] @ A_{modules[i]}^T of token t's adapter in `layer`.

        x: [T, K]. Returns u: [T, len(modules), R >= max_rank] in x's dtype or float32 (fp32
        accumulation). Only u[t, i, :r] of tokens with an adapter is defined (r: the module's rank
        for that adapter and layer, 0 where it is not targeted); the rest may hold anything (the
        Triton ops leave it unwritten: no memset per call), and `expand` never reads it.
        """
        ...

    def expand(
        self,
        y: torch.Tensor,
        u: torch.Tensor,
        layer: int,
        modules: tuple[int, ...],
        out_offsets: tuple[int, ...],
        ctx: LoraContext,
    ) -> None:
        """y[t, off_i : off_i + out_i] += scale_i * u[t, i, :r_i] @ B_{modules[i]}^T, in place; reads
        only those entries of u (what shrink defines), whatever the others hold.

        y: [T, N]; u in y's dtype or float32, rounded to y's dtype before the product (so a
        float32 u from shrink gives what its cast would). Tokens without adapter, and modules
        the adapter does not target, are untouched.
        """
        ...


class AttentionOps(Protocol):
    def write_kv(self, pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> None:
        """Store each new token's K/V at its slot. k, v: [T, n_kv, head_dim]."""
        ...

    def attend(self, q: torch.Tensor, pool: torch.Tensor, layer: int, meta: AttentionMeta, scale: float) -> torch.Tensor:
        """Causal attention of each query over its sequence's cached K/V (written by write_kv).

        q: [T, n_heads, head_dim] -> out [T, n_heads, head_dim]. Query i of a sequence with q_len new
        tokens and seq_len total sits at position seq_len - q_len + i and sees keys 0..that position.
        GQA: head h reads KV head h // (n_heads // n_kv).
        """
        ...

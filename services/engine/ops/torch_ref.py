"""Pure-torch reference ops: simple, slow, and read through the page tables like the kernels.

These define the semantics the Triton kernels are tested against, and run the engine on the CPU.
"""

from __future__ import annotations

import torch

from .base import AttentionMeta, LoraContext

# ---------------------------------------------------------------------------------------------
# LoRA: gather an adapter's matrices out of the pool, then plain matmuls per segment.
# ---------------------------------------------------------------------------------------------


def gather_virtual(pool: torch.Tensor, layer: int, pages: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of a slot's per-layer virtual buffer, as a flat tensor.

    pool: [L, num_pages, P]; pages: [max_pages] int32 page table row of the slot.
    """
    page_elems = pool.shape[2]
    v = torch.arange(start, start + count, device=pool.device)
    page = pages.long()[v // page_elems]
    return pool[layer, page, v % page_elems]


def read_lora_matrix(ctx: LoraContext, slot: int, layer: int, module: int, which: str) -> torch.Tensor:
    """A_m as [r, in] (which='a') or B_m^T as [r, out] (which='b') of the adapter in `slot`.

    Reads the first r rows, r being the module's rank in this layer (<= its layout rank).
    """
    t = ctx.tables
    rank = int(t.ranks[slot, layer, module])
    off = int((t.a_off if which == "a" else t.b_off)[slot, module])
    width = t.module_shapes[module][0 if which == "a" else 1]
    flat = gather_virtual(ctx.pool, layer, t.page_table[slot], off, rank * width)
    return flat.view(rank, width)


class TorchLoraOps:
    """Reference shrink/expand: per segment, x @ A^T then u @ B^T * scale."""

    def shrink(self, x: torch.Tensor, layer: int, modules: tuple[int, ...], ctx: LoraContext) -> torch.Tensor:
        batch = ctx.batch
        u = torch.zeros(x.shape[0], len(modules), max(batch.max_rank, 1), dtype=x.dtype, device=x.device)
        if batch.empty:
            return u
        for start, length, slot in _segments(ctx):
            xs = x[start : start + length].float()  # [n, K]
            for i, m in enumerate(modules):
                r = int(ctx.tables.ranks[slot, layer, m])
                if r == 0:
                    continue
                a = read_lora_matrix(ctx, slot, layer, m, "a")  # [r, K]
                u[start : start + length, i, :r] = (xs @ a.float().T).to(x.dtype)
        return u

    def expand(self, y, u, layer, modules, out_offsets, ctx) -> None:
        if ctx.batch.empty:
            return
        for start, length, slot in _segments(ctx):
            for i, (m, off) in enumerate(zip(modules, out_offsets)):
                r = int(ctx.tables.ranks[slot, layer, m])
                if r == 0:
                    continue
                scale = float(ctx.tables.scales[slot, layer, m])
                bt = read_lora_matrix(ctx, slot, layer, m, "b")  # [r, out]
                us = u[start : start + length, i, :r].to(y.dtype)  # float32 u is rounded to y's dtype first
                delta = (us.float() @ bt.float()) * scale  # [n, out]
                ys = y[start : start + length, off : off + bt.shape[1]]
                ys.copy_((ys.float() + delta).to(y.dtype))


def _segments(ctx: LoraContext):
    b = ctx.batch
    starts, lens, slots = b.seg_start.tolist(), b.seg_len.tolist(), b.seg_slot.tolist()
    return zip(starts, lens, slots)


# ---------------------------------------------------------------------------------------------
# Paged attention: gather each sequence's K/V through its block table, then masked softmax.
# ---------------------------------------------------------------------------------------------


def kv_view(pool: torch.Tensor, layer: int, block_size: int, num_kv_heads: int) -> torch.Tensor:
    """pool[layer] as [num_pages, 2, block_size, n_kv, head_dim] (K at [:, 0], V at [:, 1])."""
    num_pages, page_elems = pool.shape[1], pool.shape[2]
    head_dim = page_elems // (2 * block_size * num_kv_heads)
    return pool[layer].view(num_pages, 2, block_size, num_kv_heads, head_dim)


class TorchAttentionOps:
    def write_kv(self, pool, layer, k, v, meta: AttentionMeta) -> None:
        kv = kv_view(pool, layer, meta.block_size, k.shape[1])
        page = meta.slot_mapping // meta.block_size
        offset = meta.slot_mapping % meta.block_size
        kv[page, 0, offset] = k.to(pool.dtype)
        kv[page, 1, offset] = v.to(pool.dtype)

    def attend(self, q, pool, layer, meta: AttentionMeta, scale: float) -> torch.Tensor:
        n_heads = q.shape[1]
        num_kv = _num_kv_heads(pool, meta, q.shape[2])
        kv = kv_view(pool, layer, meta.block_size, num_kv)
        out = torch.empty_like(q)
        qs = meta.query_start.tolist()
        for b, seq_len in enumerate(meta.seq_lens.tolist()):
            q_lo, q_hi = qs[b], qs[b + 1]
            n_blocks = -(-seq_len // meta.block_size)
            pages = meta.block_tables[b, :n_blocks].long()
            k = kv[pages, 0].reshape(-1, num_kv, q.shape[2])[:seq_len]  # [S, n_kv, D]
            v = kv[pages, 1].reshape(-1, num_kv, q.shape[2])[:seq_len]
            group = n_heads // num_kv
            k = k.repeat_interleave(group, dim=1).float()  # [S, H, D]
            v = v.repeat_interleave(group, dim=1).float()
            qb = q[q_lo:q_hi].float()  # [n, H, D]
            scores = torch.einsum("nhd,shd->hns", qb, k) * scale
            q_pos = torch.arange(seq_len - (q_hi - q_lo), seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None]  # [n, S]
            scores.masked_fill_(mask[None], float("-inf"))
            probs = scores.softmax(dim=-1)
            out[q_lo:q_hi] = torch.einsum("hns,shd->nhd", probs, v).to(q.dtype)
        return out


def _num_kv_heads(pool: torch.Tensor, meta: AttentionMeta, head_dim: int) -> int:
    return pool.shape[2] // (2 * meta.block_size * head_dim)

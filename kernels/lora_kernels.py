"""Triton kernels of the multi-LoRA shrink/expand over the unified pool (S-LoRA's MBGMV/MBGMM).

Launch wrappers, checks and tile choices live in lora_ops.py; this file holds only device code.

Every kernel walks a *work list* built by `lora_plan_kernel`: one item per (segment, block of
BLOCK_T tokens inside it). Work items past the real ones carry seg = -1 and exit at once, so a
grid sized from static capacities (cdiv(T, BLOCK_T) + G items) can be captured in a CUDA graph.

Adapter matrices are read through the slot's page table, element by element (layout.py)::

    virtual element v  ->  pool[layer, page_table[slot, v // P], v % P]

A tile chunk of at most P consecutive elements of one row spans at most two pages, so each row
needs two page-table loads per chunk (p0 for the chunk's first page, p1 for the next) instead of
one per element. With ALIGNED (every width and P multiples of 16, offsets 16-aligned as the
layout guarantees) runs of 16 elements are contiguous and 16-aligned: hints let Triton vectorize.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["G", "W"])
def lora_plan_kernel(seg_len_ptr, work_seg_ptr, work_blk_ptr, G, W, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr):
    """Work list of (segment, token block) pairs, computed on the device (no host sync).

    Semantics (torch)::

        nblk = (seg_len + BLOCK_T - 1) // BLOCK_T          # [G]
        cum = nblk.cumsum(0)                               # inclusive
        w = torch.arange(W)
        seg = torch.searchsorted(cum, w, right=True)       # segment holding work item w
        work_seg = torch.where(w < cum[-1], seg, -1)       # [W] int32
        work_blk = w - (cum - nblk)[seg]                   # [W] int32, block index inside the segment

    Writes work_seg[W], work_blk[W] (int32). Segments of length 0 get no item.
    """
    pid = tl.program_id(0)
    w = pid * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW]
    count = tl.zeros([BLOCK_W], dtype=tl.int32)  # segments that end at or before w
    base = tl.zeros([BLOCK_W], dtype=tl.int32)  # first work item of w's segment
    carry = tl.zeros([], dtype=tl.int32)  # work items of the segments before this chunk
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_mask = offs_g < G
        length = tl.load(seg_len_ptr + offs_g, mask=g_mask, other=0)
        nblk = (length + BLOCK_T - 1) // BLOCK_T
        cum = tl.cumsum(nblk, 0) + carry  # [BG] inclusive prefix
        ended = (cum[None, :] <= w[:, None]) & g_mask[None, :]  # [BW, BG]
        count += tl.sum(ended.to(tl.int32), 1)
        base = tl.maximum(base, tl.max(tl.where(ended, cum[None, :], 0), 1))
        carry += tl.sum(nblk, 0)
    seg = tl.where(w < carry, count, -1)
    tl.store(work_seg_ptr + w, seg, mask=w < W)
    tl.store(work_blk_ptr + w, w - base, mask=w < W)


@triton.jit
def _pick(i, a0, a1, a2, a3):
    """a_i for a fused-slice index i in 0..3 (scalars: no per-call device tensor needed)."""
    return tl.where(i == 0, a0, tl.where(i == 1, a1, tl.where(i == 2, a2, a3)))


@triton.jit
def _paged_tile(pool_layer, pt_row_ptr, vpage, voff, cols, row_mask, max_pages, page_elems, ALIGNED: tl.constexpr):
    """Pointers [R, C] to a tile whose row i starts at virtual page vpage[i], offset voff[i].

    cols: [C] column offsets 0..C-1 with C <= page_elems, so a row chunk spans <= 2 pages.
    """
    p0 = tl.load(pt_row_ptr + vpage, mask=row_mask, other=0).to(tl.int64)
    p1 = tl.load(pt_row_ptr + vpage + 1, mask=row_mask & (vpage + 1 < max_pages), other=0).to(tl.int64)
    col = voff[:, None] + cols[None, :]  # [R, C] offset from the start of page p0
    phys = tl.where(col < page_elems, p0[:, None] * page_elems + col, p1[:, None] * page_elems + (col - page_elems))
    if ALIGNED:
        phys = tl.max_contiguous(tl.multiple_of(phys, [1, 16]), [1, 16])
    return pool_layer + phys


@triton.jit
def _row_two_pages(pt_row_ptr, v_row, row_mask, max_pages, page_elems):
    """For rows that span at most two pages from virtual start v_row [R]: (base0, base1, split).

    Element k of a row lives at base0 + k for k < split, else at base1 + k (pool_layer offsets).
    Loading both page ids once per program keeps page-table loads out of the streaming loop.
    """
    vpage = v_row // page_elems
    voff = v_row - vpage * page_elems
    p0 = tl.load(pt_row_ptr + vpage, mask=row_mask, other=0).to(tl.int64)
    p1 = tl.load(pt_row_ptr + vpage + 1, mask=row_mask & (vpage + 1 < max_pages), other=0).to(tl.int64)
    return p0 * page_elems + voff, p1 * page_elems + voff - page_elems, page_elems - voff


@triton.jit
def _two_page_tile(pool_layer, base0, base1, split, k, ALIGNED: tl.constexpr):
    """Pointers [R, C] to elements k [C] of rows described by _row_two_pages."""
    phys = tl.where(k[None, :] < split[:, None], base0[:, None] + k[None, :], base1[:, None] + k[None, :])
    if ALIGNED:
        phys = tl.max_contiguous(tl.multiple_of(phys, [1, 16]), [1, 16])
    return pool_layer + phys


# Scalars whose value changes between calls but never needs specializing (fewer recompiles).
_NO_SPECIALIZE = ["layer", "max_pages", "rank_cap", "M0", "M1", "M2", "M3"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["num_mods", "num_k_splits"])
def lora_shrink_kernel(
    x_ptr, u_ptr, pool_layer, page_table_ptr, ranks_ptr, a_off_ptr,
    work_seg_ptr, work_blk_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    layer, K, max_pages, page_elems, rank_cap, num_mods, num_k_splits, k_per_split,
    stride_x_t, stride_u_t,
    stride_pt_s, stride_rank_s, stride_rank_l, stride_off_s,
    M0, M1, M2, M3,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr, ROW_IN_TWO_PAGES: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """u[t, i, :r] = x[t] @ A_{m_i}[slot]^T for the tokens of one (segment, token block).

    Semantics (torch), for each segment g with slot s and each fused slice i (module m_i)::

        r = ranks[s, layer, m_i]                               # 0: slice skipped
        A = virtual(s, a_off[s, m_i], r * K).view(r, K)        # [r, K], through the page table
        u[start:start+len, i, :r] = (x[start:start+len].float() @ A.float().T).to(u.dtype)

    The fused slices are the rows of one tile: row j of u[t] (flattened [n * R]) is rank j % R of
    slice j // R, so one program reads x once for every slice its BLOCK_R rows cover.
    x: [T, K] (fp16/bf16/fp32); u: [T, n, R] (R = rank_cap). Writes u[t, i, :r] of the segments'
    tokens and nothing else (the rest of u is undefined: LoraOps.shrink). With ATOMIC u is float32,
    pre-zeroed by the caller, and each of the num_k_splits programs of a tile adds its partial sum
    over k_per_split columns of K (split-K, for grids too small to fill the GPU).
    Grid: (cdiv(n * R, BLOCK_R) * num_k_splits, work items).
    """
    # Row blocks x K splits vary fastest: programs launched together share the x tile in L2.
    rb = tl.program_id(0) // num_k_splits
    ks = tl.program_id(0) % num_k_splits
    w = tl.program_id(1)
    g = tl.load(work_seg_ptr + w)
    if g < 0:
        return
    slot = tl.load(seg_slot_ptr + g)
    offs_j = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] flattened (slice, rank) rows
    row_ok = offs_j < num_mods * rank_cap
    i_row = offs_j // rank_cap
    k_row = offs_j - i_row * rank_cap
    m_row = _pick(i_row, M0, M1, M2, M3)
    # Ranks clamped to u's capacity: a wrong batch.max_rank truncates instead of writing past u.
    rank_row = tl.load(ranks_ptr + slot * stride_rank_s + layer * stride_rank_l + m_row, mask=row_ok, other=0)
    r_mask = row_ok & (k_row < tl.minimum(rank_row, rank_cap))
    if tl.max(r_mask.to(tl.int32), 0) == 0:
        return
    t_end = tl.load(seg_start_ptr + g) + tl.load(seg_len_ptr + g)
    offs_t = tl.load(seg_start_ptr + g) + tl.load(work_blk_ptr + w) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < t_end
    cols = tl.arange(0, BLOCK_K)
    k_start = ks * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    # Virtual start of each row of A: a_off[m] + rank * K.
    a_row = tl.load(a_off_ptr + slot * stride_off_s + m_row, mask=row_ok, other=0)
    v_row = a_row + k_row.to(tl.int64) * K  # [BR]
    pt_row = page_table_ptr + slot.to(tl.int64) * stride_pt_s
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x_t
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    if ROW_IN_TWO_PAGES:  # K <= P: page ids loaded once, the K loop only streams x and A
        base0, base1, split = _row_two_pages(pt_row, v_row, r_mask, max_pages, page_elems)
        for k0 in range(k_start, k_end, BLOCK_K):
            k_mask = (k0 + cols) < k_end
            xt = tl.load(x_rows + (k0 + cols)[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
            a_ptrs = _two_page_tile(pool_layer, base0, base1, split, k0 + cols, ALIGNED)
            at = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BR, BK]
            acc += tl.dot(xt, tl.trans(at).to(xt.dtype), input_precision=DOT_PRECISION)
    else:  # long rows: a (page, offset) cursor per row, two page ids per chunk
        v_first = v_row + k_start
        vpage = v_first // page_elems
        voff = v_first - vpage * page_elems
        for k0 in range(k_start, k_end, BLOCK_K):
            k_mask = (k0 + cols) < k_end
            xt = tl.load(x_rows + (k0 + cols)[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            a_ptrs = _paged_tile(pool_layer, pt_row, vpage, voff, cols, r_mask, max_pages, page_elems, ALIGNED)
            at = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.dot(xt, tl.trans(at).to(xt.dtype), input_precision=DOT_PRECISION)
            # Advance each row's cursor by BLOCK_K (<= P) elements: at most one page boundary.
            voff += BLOCK_K
            wrapped = voff >= page_elems
            voff = tl.where(wrapped, voff - page_elems, voff)
            vpage += wrapped.to(tl.int64)
    u_ptrs = u_ptr + offs_t.to(tl.int64)[:, None] * stride_u_t + offs_j[None, :]
    u_mask = t_mask[:, None] & r_mask[None, :]
    if ATOMIC:
        tl.atomic_add(u_ptrs, acc, mask=u_mask, sem="relaxed")
    else:
        tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=u_mask)


@triton.jit
def _expand_columns(y_ptr, y_rows, u_rows, t_mask, pool_layer, pt_row, b_start, rank, scale, n_out, c_start, c_end,
                    max_pages, page_elems, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
                    ROW_IN_TWO_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """y[rows, c_start:c_end] += scale * u[rows, :rank] @ Bt[:rank, c_start:c_end] in BLOCK_N chunks.

    y_rows / u_rows: [BT] row pointers (y at the slice's offset, u at the slice); b_start: the
    virtual start of B^T row 0 of the slice (rows of n_out elements); rank <= BLOCK_R.
    """
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    cols = tl.arange(0, BLOCK_N)
    # float32 u (split-K shrink) is rounded to y's dtype here, as a cast before the launch would.
    ut = tl.load(u_rows[:, None] + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)  # [BT, BR]
    ut = ut.to(y_ptr.dtype.element_ty)
    v_row = b_start + offs_r.to(tl.int64) * n_out + c_start  # [BR]
    if ROW_IN_TWO_PAGES:  # N_i <= P for every slice: page ids loaded once
        base0, base1, split = _row_two_pages(pt_row, v_row, r_mask, max_pages, page_elems)
        for n0 in range(c_start, c_end, BLOCK_N):
            n_mask = (n0 + cols) < c_end
            b_ptrs = _two_page_tile(pool_layer, base0, base1, split, (n0 - c_start) + cols, ALIGNED)
            bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BR, BN]
            acc = tl.dot(ut, bt.to(ut.dtype), input_precision=DOT_PRECISION)  # [BT, BN]
            y_mask = t_mask[:, None] & n_mask[None, :]
            y_old = tl.load(y_rows[:, None] + (n0 + cols)[None, :], mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_rows[:, None] + (n0 + cols)[None, :], (y_old + acc * scale).to(y_ptr.dtype.element_ty), mask=y_mask)
    else:  # long rows: a (page, offset) cursor per row, advanced by BLOCK_N (<= P) per chunk
        vpage = v_row // page_elems
        voff = v_row - vpage * page_elems
        for n0 in range(c_start, c_end, BLOCK_N):
            n_mask = (n0 + cols) < c_end
            b_ptrs = _paged_tile(pool_layer, pt_row, vpage, voff, cols, r_mask, max_pages, page_elems, ALIGNED)
            bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(ut, bt.to(ut.dtype), input_precision=DOT_PRECISION)
            y_mask = t_mask[:, None] & n_mask[None, :]
            y_old = tl.load(y_rows[:, None] + (n0 + cols)[None, :], mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_rows[:, None] + (n0 + cols)[None, :], (y_old + acc * scale).to(y_ptr.dtype.element_ty), mask=y_mask)
            voff += BLOCK_N
            wrapped = voff >= page_elems
            voff = tl.where(wrapped, voff - page_elems, voff)
            vpage += wrapped.to(tl.int64)


@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["num_col_splits"])
def lora_expand_kernel(
    y_ptr, u_ptr, pool_layer, page_table_ptr, ranks_ptr, scales_ptr, b_off_ptr,
    work_seg_ptr, work_blk_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    layer, max_pages, page_elems, rank_cap, num_col_splits, cols_per_split,
    stride_y_t, stride_u_t, stride_u_m,
    stride_pt_s, stride_rank_s, stride_rank_l, stride_off_s,
    M0, M1, M2, M3, N0, N1, N2, N3, O0, O1, O2, O3,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SMALL_R: tl.constexpr, SMALL_N: tl.constexpr,
    ALIGNED: tl.constexpr, Y_ALIGNED: tl.constexpr, ROW_IN_TWO_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """y[t, o_i : o_i + N_i] += scale * u[t, i, :r] @ B_{m_i}[slot]^T, in place.

    Semantics (torch), for each segment g with slot s and each fused slice i (module m_i)::

        r = ranks[s, layer, m_i]                               # 0: slice skipped, y untouched
        Bt = virtual(s, b_off[s, m_i], r * N_i).view(r, N_i)   # [r, N_i], B^T through the page table
        d = (u[rows, i, :r].float() @ Bt.float()) * scales[s, layer, m_i]
        y[rows, o_i:o_i+N_i] = (y[rows, o_i:o_i+N_i].float() + d).to(y.dtype)

    y: [T, N] (fp16/bf16/fp32, row stride free, unit column stride), u: [T, n, R] with R <= BLOCK_R,
    in y's dtype or float32 (rounded to y's dtype on load: the same result as a cast before).
    Grid: (n slices * num_col_splits, work items). A program owns columns
    [cs * cols_per_split, (cs + 1) * cols_per_split) of one slice for one token block and streams
    them in BLOCK_N chunks (u loaded once, page ids once): long programs keep loads in flight.
    A segment whose rank is at most SMALL_R while the tile holds more (BLOCK_R > SMALL_R: a rank
    capacity above the adapter's, as CUDA graphs capture) streams [SMALL_R, SMALL_N] tiles of the
    same size instead: a rank-8 adapter under a rank-64 capacity needs a quarter of the chunks.
    """
    # Slices x column splits vary fastest: programs launched together share the u tile and B in L2.
    i = tl.program_id(0) // num_col_splits
    cs = tl.program_id(0) % num_col_splits
    w = tl.program_id(1)
    g = tl.load(work_seg_ptr + w)
    if g < 0:
        return
    slot = tl.load(seg_slot_ptr + g)
    m = _pick(i, M0, M1, M2, M3)
    n_out = _pick(i, N0, N1, N2, N3)
    if ALIGNED:
        n_out = tl.multiple_of(n_out, 16)  # lets the y and B^T masks stay uniform over 16-element runs
    # Clamped to u's rank capacity: a wrong batch.max_rank truncates instead of reading past u.
    rank = tl.minimum(tl.load(ranks_ptr + slot * stride_rank_s + layer * stride_rank_l + m), rank_cap)
    c_start = cs * cols_per_split
    if (rank == 0) | (c_start >= n_out):
        return
    c_end = tl.minimum(c_start + cols_per_split, n_out)
    scale = tl.load(scales_ptr + slot * stride_rank_s + layer * stride_rank_l + m)
    t_end = tl.load(seg_start_ptr + g) + tl.load(seg_len_ptr + g)
    offs_t = tl.load(seg_start_ptr + g) + tl.load(work_blk_ptr + w) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < t_end
    u_rows = u_ptr + offs_t.to(tl.int64) * stride_u_t + i * stride_u_m  # [BT]
    o_i = _pick(i, O0, O1, O2, O3)
    if Y_ALIGNED:
        o_i = tl.multiple_of(o_i, 16)  # offsets and y's row stride are multiples of 16: vector y access
    y_rows = y_ptr + offs_t.to(tl.int64) * stride_y_t + o_i  # [BT]
    pt_row = page_table_ptr + slot.to(tl.int64) * stride_pt_s
    b_start = tl.load(b_off_ptr + slot * stride_off_s + m)
    if BLOCK_R > SMALL_R:
        if rank <= SMALL_R:
            _expand_columns(y_ptr, y_rows, u_rows, t_mask, pool_layer, pt_row, b_start, rank, scale, n_out, c_start,
                            c_end, max_pages, page_elems, SMALL_R, SMALL_N, ALIGNED, ROW_IN_TWO_PAGES, DOT_PRECISION)  # fmt: skip
        else:
            _expand_columns(y_ptr, y_rows, u_rows, t_mask, pool_layer, pt_row, b_start, rank, scale, n_out, c_start,
                            c_end, max_pages, page_elems, BLOCK_R, BLOCK_N, ALIGNED, ROW_IN_TWO_PAGES, DOT_PRECISION)  # fmt: skip
    else:
        _expand_columns(y_ptr, y_rows, u_rows, t_mask, pool_layer, pt_row, b_start, rank, scale, n_out, c_start,
                        c_end, max_pages, page_elems, BLOCK_R, BLOCK_N, ALIGNED, ROW_IN_TWO_PAGES, DOT_PRECISION)  # fmt: skip

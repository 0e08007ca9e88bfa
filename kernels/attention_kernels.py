"""Triton kernels of paged attention over the unified pool (launchers in attention_ops.py).

KV page p of layer l is pool[l, p].view(2, block_size, n_kv, D): K then V. Key j of sequence b:

    page = block_tables[b, j // block_size];  row = page * P + (j % block_size) * n_kv * D + h_kv * D
    K[j, h_kv, :] = pool_layer[row : row + D];  V[j, h_kv, :] = pool_layer[row + block_size*n_kv*D : ... + D]

Softmax runs in base 2: scores are pre-multiplied by scale * log2(e).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    k_ptr, v_ptr, pool_layer, slot_mapping_ptr, stride_k_t, stride_v_t, block_size, page_elems, kv_width, BLOCK: tl.constexpr
):  # fmt: skip
    """Store each new token's K/V in its page slot.

    Semantics (torch)::

        kv = pool[layer].view(num_pages, 2, block_size, n_kv, D)
        page, off = slot_mapping // block_size, slot_mapping % block_size
        kv[page, 0, off] = k.to(pool.dtype); kv[page, 1, off] = v.to(pool.dtype)

    k, v: [T, n_kv, D] (rows contiguous); slot_mapping: [T] int64, < 0 skips the token (padding).
    Grid: (T,). Writes 2 * n_kv * D elements of the pool per token.
    """
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t)
    if slot < 0:
        return
    page = slot // block_size
    offs = tl.arange(0, BLOCK)
    mask = offs < kv_width
    dst = pool_layer + page * page_elems + (slot - page * block_size) * kv_width + offs
    k = tl.load(k_ptr + t.to(tl.int64) * stride_k_t + offs, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_v_t + offs, mask=mask)
    tl.store(dst, k.to(pool_layer.dtype.element_ty), mask=mask)
    tl.store(dst + block_size * kv_width, v.to(pool_layer.dtype.element_ty), mask=mask)


@triton.jit
def _key_rows(block_tables_row, offs_n, n_mask, block_size, page_elems, kv_width, kv_head, HEAD_DIM: tl.constexpr):
    """Element offset in pool[layer] of K[j, kv_head, 0] for each key j in offs_n ([BN] int64)."""
    page = tl.load(block_tables_row + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
    row = page * page_elems + (offs_n % block_size) * kv_width + kv_head * HEAD_DIM
    return tl.multiple_of(row, 16)  # P, n_kv * D and D are multiples of 16


@triton.jit(do_not_specialize=["n_heads", "num_splits"])
def decode_attention_kernel(
    q_ptr, pool_layer, block_tables_ptr, seq_lens_ptr, query_start_ptr, part_out_ptr, part_lse_ptr, out_ptr,
    scale_log2, stride_q_t, stride_q_h, stride_bt_b, stride_o_t, stride_o_h,
    block_size, page_elems, kv_width, n_heads, chunk, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One split of the keys of one decode sequence, for the GROUP query heads of one KV head.

    Semantics (torch), sequence b (query token t = query_start[b]), split s, heads H of kv_head::

        keys = range(s * chunk, min((s + 1) * chunk, seq_lens[b]))
        p = softmax(q[t, H] @ K[keys, kv_head].T * scale)         # the query sits at seq_len - 1
        part_out[b, H, s] = p @ V[keys, kv_head];  part_lse[b, H, s] = logsumexp2 of the scores

    SINGLE_SPLIT: the one split covers every key; the result goes straight to out[t, H].
    q: [T, n_heads, D]; part_out: [B, n_heads, num_splits, D] fp32; part_lse: [B, n_heads, num_splits] fp32.
    Grid: (num_decodes, n_kv, num_splits). Empty splits write lse = -inf (and zeros).
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    tq = tl.load(query_start_ptr + b).to(tl.int64)
    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tq * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    v_shift = block_size * kv_width
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        rows = _key_rows(bt_row, offs_n, n_mask, block_size, page_elems, kv_width, kv_head, HEAD_DIM)
        kt = tl.load(pool_layer + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)  # [BN, D]
        vt = tl.load(pool_layer + (rows + v_shift)[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(kt).to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # [GP, BN]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # empty split: acc = 0 -> 0
    if SINGLE_SPLIT:
        o_ptrs = out_ptr + tq * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (b.to(tl.int64) * n_heads + heads) * num_splits + split  # [GP]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit(do_not_specialize=["n_heads", "num_splits"])
def decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, query_start_ptr, out_ptr, n_heads, num_splits, stride_o_t, stride_o_h,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one (decode sequence, head).

    Semantics (torch)::

        w = softmax(part_lse[b, h] * ln 2)                   # weights of the splits (-inf: empty)
        out[query_start[b], h] = (w[:, None] * part_out[b, h]).sum(0)   # zeros if every split is empty

    Grid: (num_decodes, n_heads). Writes one [D] row of out.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    base = (b.to(tl.int64) * n_heads + h) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)  # [SP]
    parts = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(w[:, None] * parts, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tq = tl.load(query_start_ptr + b).to(tl.int64)
    tl.store(out_ptr + tq * stride_o_t + h * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["first_seq"])
def prefill_attention_kernel(
    q_ptr, pool_layer, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    scale_log2, first_seq, stride_q_t, stride_q_h, stride_bt_b, stride_o_t, stride_o_h,
    block_size, page_elems, kv_width,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Causal attention of one block of BLOCK_M queries of one prefill sequence, one head.

    Semantics (torch), sequence b = first_seq + program_id(0), head h, query i of q_len new tokens::

        pos = seq_len - q_len + i                                  # cached prefix before it
        out[query_start[b] + i, h] = softmax(q @ K[:pos + 1, h // GROUP].T * scale) @ V[:pos + 1, h // GROUP]

    Grid: (num_prefills, cdiv(max_query_len, BLOCK_M), n_heads); blocks past q_len exit.
    """
    b = first_seq + tl.program_id(0)
    qb = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if qb * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    pos = seq_len - q_len + offs_m  # [BM] absolute position of each query
    offs_d = tl.arange(0, HEAD_DIM)
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_q_t + h * stride_q_h + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    kv_head = h // GROUP
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    v_shift = block_size * kv_width
    hi = tl.minimum(seq_len, seq_len - q_len + (qb + 1) * BLOCK_M)  # keys the last query of the block sees
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        rows = _key_rows(bt_row, offs_n, n_mask, block_size, page_elems, kv_width, kv_head, HEAD_DIM)
        kt = tl.load(pool_layer + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        vt = tl.load(pool_layer + (rows + v_shift)[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(kt).to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # [BM, BN]
        visible = (offs_n[None, :] <= pos[:, None]) & n_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        # Key 0 is visible to every row, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_o_t + h * stride_o_h + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])

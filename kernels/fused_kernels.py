"""Triton kernels of the decoder's elementwise work: (add +) RMSNorm, RoPE on q/k, SiLU(gate) * up.

Launch wrappers, checks and block sizes live in fused_ops.py; this file holds only device code.

Rounding: each kernel reproduces the torch reference's roundings (services/engine/model.py,
rope.py): a torch op on fp16/bf16 tensors computes in fp32 and rounds its result to the tensor
dtype once, so each such op here is an fp32 computation followed by `.to(DT)` at the same point.
For bf16/fp16 that makes RoPE bitwise equal; RMSNorm and SiLU differ only where the fp32 sum
order of the mean or the exp differ from torch's (an occasional last-bit flip after rounding).
Every grid is derived from shapes only and nothing reads values on the host: CUDA-graph safe.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_d, stride_o,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """RMSNorm of one row, after adding a delta into the residual in place (HAS_DELTA).

    Semantics (torch), row t of x [T, H], delta [T, H], weight [H], out [T, H], all dtype DT::

        if HAS_DELTA:
            x[t] = x[t] + delta[t]                     # fp32 sum, rounded to DT once; in place
        xf = x[t].float()
        n = (xf * torch.rsqrt(xf.pow(2).mean() + eps)).to(DT)
        out[t] = weight * n                            # fp32 product, rounded to DT once

    Grid: (T,). BLOCK >= H (a power of two): the whole row lives in registers, one pass.
    Writes out[t, :H] and, with HAS_DELTA, x[t, :H]; reads delta only with HAS_DELTA.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * stride_x + cols
    x = tl.load(x_row, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_row, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols  # masked columns load 0: they add nothing
    normed = (xf * tl.rsqrt(mean_sq + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


@triton.jit
def rope_qk_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_pos, stride_cache, n_rot_heads,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Rotate-half RoPE, in place, on the q and k heads of one token (a block of BLOCK_H heads).

    Semantics (torch): the first n_rot_heads = nh + nkv heads of qkv's row are q's then k's
    (qkv: [T, (nh + 2 nkv) * D], dtype DT; cos, sin: [max_position, D] DT; positions: [T] int64)::

        x = qkv[t, : n_rot_heads * D].view(n_rot_heads, D)
        c, s = cos[positions[t]], sin[positions[t]]           # [D]
        rot = torch.cat((-x[:, HALF:], x[:, :HALF]), -1)
        x[:] = x * c + rot * s                                # each product rounded to DT, then the sum

    D = 2 * HALF; BLOCK_D >= HALF (a power of two). Grid: (T, cdiv(n_rot_heads, BLOCK_H)).
    Writes only those heads' D elements; v's columns are never touched. Contract (not checked:
    a device value): 0 <= positions[t] < max_position.
    """
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    pos = tl.load(pos_ptr + t * stride_pos).to(tl.int64)
    cache = pos * stride_cache + d
    c1 = tl.load(cos_ptr + cache, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cache + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cache, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cache + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    mask = (heads < n_rot_heads)[:, None] & d_mask[None, :]
    lo = qkv_ptr + t * stride_t + heads[:, None].to(tl.int64) * (2 * HALF) + d[None, :]  # [BH, BD]
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0).to(tl.float32)
    DT = qkv_ptr.dtype.element_ty
    # (-x2) * s rounds to -(x2 * s) (round-to-nearest-even is symmetric), and a + (-b) == a - b.
    o1 = (x1 * c1).to(DT).to(tl.float32) - (x2 * s1).to(DT).to(tl.float32)
    o2 = (x2 * c2).to(DT).to(tl.float32) + (x1 * s2).to(DT).to(tl.float32)
    tl.store(lo, o1.to(DT), mask=mask)
    tl.store(lo + HALF, o2.to(DT), mask=mask)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr):
    """SiLU(gate) * up from the fused gate_up output.

    Semantics (torch), gate_up: [T, 2I] dtype DT, out: [T, I] DT::

        gate, up = gate_up.chunk(2, dim=-1)
        out = F.silu(gate) * up        # silu: g / (1 + exp(-g)) in fp32, rounded to DT; product rounded

    Grid: (T, cdiv(I, BLOCK)). Writes out[t, block]; reads gate_up only.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    src = gu_ptr + row * stride_gu + cols
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + n_cols, mask=mask, other=0.0).to(tl.float32)
    DT = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(DT), mask=mask)

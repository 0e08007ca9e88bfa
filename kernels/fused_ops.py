"""TritonElementwiseOps: the decoder's elementwise work as fused Triton kernels (fused_kernels.py).

Same interface and results (within rounding, see fused_kernels.py) as TorchElementwiseOps in
services/engine/model.py, which is what the CPU engine runs and what these are tested against:

    rms_norm(x, weight, eps) -> h                     one launch instead of ~7 torch ops
    add_rms_norm(x, delta, weight, eps) -> h          x += delta in place, then h = RMSNorm(x)
    rope_qk(qkv, positions, rope, nh, nkv)            q and k rotated in place inside qkv, one launch
    silu_mul(gate_up) -> silu(gate) * up

NOTE (CUDA graphs): checks read shapes, dtypes, strides and devices only (never values) and
grids come from shapes, so every call can be captured; no host sync anywhere.
"""

from __future__ import annotations

import torch

from . import fused_kernels as K
from .checks import FLOAT_DTYPES, cdiv, check_kernel_runnable, next_pow2, require

MAX_NORM_COLS = 32768  # one row per program, held in registers: beyond this a loop would be needed
ROPE_TILE = 2048  # elements (heads x half head dim) per RoPE program
SILU_BLOCK = 1024


def _check_rows(t: torch.Tensor, name: str) -> None:
    require(t.dim() == 2, f"{name} must be [T, N], got shape {tuple(t.shape)}")
    require(t.dtype in FLOAT_DTYPES, f"{name} dtype {t.dtype} is not one of fp16/bf16/fp32")
    require(t.stride(1) == 1 or t.shape[1] <= 1, f"{name} must have unit stride along its last dim")


def _norm_warps(block: int) -> int:
    return min(16, max(1, block // 512))


class TritonElementwiseOps:
    """Fused (add +) RMSNorm, RoPE on q/k and SiLU-and-mul; see fused_kernels.py for semantics."""

    backend = "triton"  # ops/select.is_triton

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [T, H] -> weight * normalise(x): [T, H] (x is not modified)."""
        return self._norm(x, None, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta (in place, the residual stream), then returns RMSNorm(x): [T, H]."""
        require(delta.shape == x.shape, f"delta shape {tuple(delta.shape)} != x shape {tuple(x.shape)}")
        _check_rows(delta, "delta")
        require(delta.dtype == x.dtype and delta.device == x.device, "delta must match x's dtype and device")
        return self._norm(x, delta, weight, eps)

    def _norm(self, x, delta, weight, eps) -> torch.Tensor:
        _check_rows(x, "x")
        check_kernel_runnable(K.rms_norm_kernel, x.device)
        num_tokens, hidden = x.shape
        require(0 < hidden <= MAX_NORM_COLS, f"hidden size {hidden} out of range 1..{MAX_NORM_COLS}")
        require(weight.shape == (hidden,) and weight.is_contiguous(), f"weight must be contiguous [{hidden}]")
        require(weight.dtype == x.dtype and weight.device == x.device, "weight must match x's dtype and device")
        if delta is not None:  # x is written: its rows must not overlap (no broadcast views)
            require(num_tokens <= 1 or x.stride(0) >= hidden, "x rows overlap; add_rms_norm writes x in place")
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
        if num_tokens == 0:
            return out
        block = next_pow2(hidden)
        has_delta = delta is not None
        d = delta if has_delta else x  # never read without HAS_DELTA; any valid pointer will do
        K.rms_norm_kernel[(num_tokens,)](
            x, d, weight, out, hidden, float(eps), x.stride(0), d.stride(0), out.stride(0),
            HAS_DELTA=has_delta, BLOCK=block, num_warps=_norm_warps(block),
        )  # fmt: skip
        return out

    def rope_qk(self, qkv: torch.Tensor, positions: torch.Tensor, rope, num_heads: int, num_kv_heads: int) -> None:
        """Rotate q and k in place inside qkv [T, (nh + 2 nkv) * D] by rope.cos/sin [P, D] at positions [T]."""
        _check_rows(qkv, "qkv")
        check_kernel_runnable(K.rope_qk_kernel, qkv.device)
        cos, sin = rope.cos, rope.sin
        require(cos.dim() == 2 and cos.shape == sin.shape, "rope cos/sin must be [max_position, D] alike")
        require(cos.is_contiguous() and sin.is_contiguous(), "rope cos/sin must be contiguous")
        require(cos.dtype == qkv.dtype and sin.dtype == qkv.dtype, f"rope cache dtype {cos.dtype} != qkv dtype {qkv.dtype}")
        require(cos.device == qkv.device, f"rope cache on {cos.device}, qkv on {qkv.device}")
        head_dim = cos.shape[1]
        require(head_dim % 2 == 0, f"head_dim {head_dim} must be even (rotate-half)")
        num_tokens, width = qkv.shape
        require(num_heads > 0 and num_kv_heads > 0, "num_heads and num_kv_heads must be positive")
        require(width == (num_heads + 2 * num_kv_heads) * head_dim,
                f"qkv width {width} != (nh {num_heads} + 2 * nkv {num_kv_heads}) * D {head_dim}")  # fmt: skip
        require(positions.dim() == 1 and positions.shape[0] == num_tokens, f"positions must be [{num_tokens}]")
        require(positions.dtype == torch.int64 and positions.device == qkv.device, "positions must be int64 on qkv's device")
        if num_tokens == 0:
            return
        half = head_dim // 2
        block_d = next_pow2(half)
        rot_heads = num_heads + num_kv_heads  # q's heads then k's: contiguous at the row's start
        block_h = min(next_pow2(rot_heads), max(1, ROPE_TILE // block_d))
        K.rope_qk_kernel[(num_tokens, cdiv(rot_heads, block_h))](
            qkv, positions, cos, sin, qkv.stride(0), positions.stride(0), cos.stride(0), rot_heads,
            HALF=half, BLOCK_D=block_d, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: [T, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:]: [T, I]."""
        _check_rows(gate_up, "gate_up")
        check_kernel_runnable(K.silu_mul_kernel, gate_up.device)
        num_tokens, width = gate_up.shape
        require(width % 2 == 0 and width > 0, f"gate_up width {width} must be even (gate then up)")
        inter = width // 2
        out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
        if num_tokens == 0:
            return out
        block = min(SILU_BLOCK, next_pow2(inter))
        K.silu_mul_kernel[(num_tokens, cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        )  # fmt: skip
        return out

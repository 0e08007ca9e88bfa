"""TritonAttentionOps: the AttentionOps interface (services/engine/ops/base.py) on Triton kernels.

Decode (the first meta.num_decodes sequences, one query each) is split over the context
(flash-decoding): grid (num_decodes, n_kv, num_splits), then a reduce over the splits; one split
writes the output directly. Prefill sequences run a causal flash-attention kernel that reads the
cached prefix and the new tokens through the block table.

NOTE (CUDA graphs): with capture=True the number of splits comes from max_seq_len given here
(not from meta), so a captured decode step can be replayed with any context length up to it.
"""

from __future__ import annotations

import math

import torch

from lorafleet.engine.ops.base import AttentionMeta

from . import attention_kernels as A
from .checks import cdiv, check_int_tensor, check_kernel_runnable, check_pool, check_same_device, next_pow2, num_sms

LOG2E = 1.4426950408889634


class TritonAttentionOps:
    """write_kv/attend per AttentionOps; see attention_kernels.py for each kernel's torch semantics.

    capture: static-capacity mode (requires max_seq_len, the longest context a replay may have).
    split_keys: keys per decode split (rounded up to the key block); None picks enough splits to
    give every multiprocessor about four programs.
    """

    backend = "triton"  # ops/select.is_triton

    def __init__(self, *, capture: bool = False, max_seq_len: int | None = None, split_keys: int | None = None) -> None:
        if capture and (max_seq_len is None or max_seq_len < 1):
            raise ValueError("capture=True needs max_seq_len (the longest context a replay may see)")
        self.capture = capture
        self.max_seq_len = max_seq_len
        self.split_keys = split_keys
        self.min_split_keys = 256  # below this a split's fixed cost outweighs its parallelism

    def write_kv(self, pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> None:
        """Store each new token's K/V at its slot (write_kv_kernel). k, v: [T, n_kv, head_dim]."""
        check_pool(pool, layer)
        check_kernel_runnable(A.write_kv_kernel, pool.device)
        if not (k.dim() == 3 and k.shape == v.shape):
            raise ValueError(f"k and v must be [T, n_kv, D] alike, got {tuple(k.shape)} and {tuple(v.shape)}")
        num_tokens, n_kv, head_dim = k.shape
        kv_width = n_kv * head_dim
        if not (pool.shape[2] == 2 * meta.block_size * kv_width):
            raise ValueError(f"page_elems {pool.shape[2]} != 2 * block_size {meta.block_size} * n_kv {n_kv} * D {head_dim}")
        for name, t in (("k", k), ("v", v)):
            check_same_device(t, name, pool.device)
            if not (t.stride(2) == 1 and t.stride(1) == head_dim):
                raise ValueError(f"{name} rows [n_kv, D] must be contiguous")
        check_int_tensor(meta.slot_mapping, "meta.slot_mapping", torch.int64, 1, pool.device)
        if not (meta.slot_mapping.shape[0] == num_tokens):
            raise ValueError(f"meta.slot_mapping has {meta.slot_mapping.shape[0]} entries for {num_tokens} tokens")
        if num_tokens == 0:
            return
        block = next_pow2(kv_width)
        A.write_kv_kernel[(num_tokens,)](
            k, v, pool[layer], meta.slot_mapping, k.stride(0), v.stride(0), meta.block_size, pool.shape[2], kv_width,
            BLOCK=block, num_warps=4 if block <= 2048 else 8,
        )  # fmt: skip

    def attend(self, q: torch.Tensor, pool: torch.Tensor, layer: int, meta: AttentionMeta, scale: float) -> torch.Tensor:
        """Causal paged attention; q: [T, n_heads, D] -> out [T, n_heads, D] (see AttentionOps)."""
        n_kv = self._check_attend(q, pool, layer, meta)
        num_tokens, n_heads, head_dim = q.shape
        out = torch.empty_like(q)
        num_seqs = meta.seq_lens.shape[0]
        if num_tokens == 0 or num_seqs == 0:
            return out
        pool_layer = pool[layer]
        kv_width = n_kv * head_dim
        group = n_heads // n_kv
        scale_log2 = float(scale) * LOG2E
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        if meta.num_decodes > 0:
            self._decode(q, pool_layer, meta, out, scale_log2, n_kv, group, precision)
        num_prefills = num_seqs - meta.num_decodes
        if num_prefills > 0 and meta.max_query_len > 0:
            block_m, block_n, warps = (64, 64, 4) if head_dim <= 128 else (32, 32, 8)
            grid = (num_prefills, cdiv(meta.max_query_len, block_m), n_heads)
            A.prefill_attention_kernel[grid](
                q, pool_layer, meta.block_tables, meta.seq_lens, meta.query_start, out,
                scale_log2, meta.num_decodes, q.stride(0), q.stride(1), meta.block_tables.stride(0), out.stride(0), out.stride(1),
                meta.block_size, pool.shape[2], kv_width,
                GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision, num_warps=warps,
            )  # fmt: skip
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _decode(self, q, pool_layer, meta: AttentionMeta, out, scale_log2, n_kv, group, precision) -> None:
        num_decodes, n_heads, head_dim = meta.num_decodes, q.shape[1], q.shape[2]
        block_n = 64 if head_dim <= 128 else 32
        chunk, num_splits = self._splits(meta, num_decodes * n_kv, block_n, q.device)
        single = num_splits == 1
        part_out = q.new_empty((1,) if single else (num_decodes, n_heads, num_splits, head_dim), dtype=torch.float32)
        part_lse = q.new_empty((1,) if single else (num_decodes, n_heads, num_splits), dtype=torch.float32)
        A.decode_attention_kernel[(num_decodes, n_kv, num_splits)](
            q, pool_layer, meta.block_tables, meta.seq_lens, meta.query_start, part_out, part_lse, out,
            scale_log2, q.stride(0), q.stride(1), meta.block_tables.stride(0), out.stride(0), out.stride(1),
            meta.block_size, pool_layer.shape[1], n_kv * head_dim, n_heads, chunk, num_splits,
            GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim, BLOCK_N=block_n,
            SINGLE_SPLIT=single, DOT_PRECISION=precision, num_warps=4,
        )  # fmt: skip
        if not single:
            A.decode_reduce_kernel[(num_decodes, n_heads)](
                part_out, part_lse, meta.query_start, out, n_heads, num_splits, out.stride(0), out.stride(1),
                HEAD_DIM=head_dim, SPLITS_PAD=next_pow2(num_splits), num_warps=4,
            )  # fmt: skip

    def _splits(self, meta: AttentionMeta, programs_per_split: int, block_n: int, device) -> tuple[int, int]:
        """(keys per split, number of splits) from the context capacity, never from device values."""
        max_seq = self.max_seq_len if self.capture else meta.max_seq_len
        if not self.capture:
            if not (meta.max_seq_len >= 1):
                raise ValueError("meta.max_seq_len must be >= 1 when there are decodes")
        else:
            if not (meta.max_seq_len <= self.max_seq_len):
                raise ValueError(f"meta.max_seq_len {meta.max_seq_len} exceeds the capture capacity {self.max_seq_len}")
        if self.split_keys is not None:
            chunk = self.split_keys
        else:
            want = max(1, math.ceil(4 * num_sms(device) / max(programs_per_split, 1)))
            chunk = max(self.min_split_keys, cdiv(max_seq, want))
        chunk = cdiv(chunk, block_n) * block_n
        return chunk, cdiv(max(max_seq, 1), chunk)

    def _check_attend(self, q: torch.Tensor, pool: torch.Tensor, layer: int, meta: AttentionMeta) -> int:
        check_pool(pool, layer)
        check_kernel_runnable(A.decode_attention_kernel, pool.device)
        if not (q.dim() == 3):
            raise ValueError(f"q must be [T, n_heads, D], got shape {tuple(q.shape)}")
        check_same_device(q, "q", pool.device)
        if not (q.dtype == pool.dtype):
            raise ValueError(f"q dtype {q.dtype} differs from the pool's {pool.dtype}")
        num_tokens, n_heads, head_dim = q.shape
        if not (head_dim in (16, 32, 64, 128, 256)):
            raise ValueError(f"head_dim {head_dim} is not a power of two in 16..256")
        if not (q.stride(2) == 1):
            raise ValueError("q must have unit stride along head_dim")
        kv_unit = 2 * meta.block_size * head_dim
        if not (meta.block_size >= 1 and pool.shape[2] % kv_unit == 0):
            raise ValueError(f"page_elems {pool.shape[2]} is not a multiple of 2 * block_size * D = {kv_unit}")
        n_kv = pool.shape[2] // kv_unit
        if not (n_heads % n_kv == 0):
            raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
        num_seqs = meta.seq_lens.shape[0]
        check_int_tensor(meta.seq_lens, "meta.seq_lens", torch.int32, 1, pool.device)
        check_int_tensor(meta.query_start, "meta.query_start", torch.int32, 1, pool.device)
        check_int_tensor(meta.block_tables, "meta.block_tables", torch.int32, 2, pool.device)
        if not (meta.query_start.shape[0] == num_seqs + 1):
            raise ValueError(f"meta.query_start must have B+1 = {num_seqs + 1} entries")
        if not (meta.block_tables.shape[0] == num_seqs):
            raise ValueError(f"meta.block_tables must have B = {num_seqs} rows")
        if not (0 <= meta.num_decodes <= num_seqs):
            raise ValueError(f"meta.num_decodes {meta.num_decodes} out of range 0..{num_seqs}")
        return n_kv

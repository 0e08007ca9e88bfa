"""Triton paged attention (write_kv, decode split + reduce, prefill with cached prefix) against
the torch reference: tiny cases anywhere, the shape grid on GPU."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.ops.torch_ref import TorchAttentionOps
from lorafleet.kernels.attention_ops import TritonAttentionOps

from .conftest import DEVICE, requires_gpu
from .kernel_fixtures import make_attention_case, rel_err

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def check_attention(decode_lens, prefill, heads, kv_heads, head_dim, block_size, dtype, device, seed, ops=None):
    pool, meta, q, k, v = make_attention_case(decode_lens, prefill, heads, kv_heads, head_dim, block_size, dtype, device, seed)
    ops, ref = ops or TritonAttentionOps(), TorchAttentionOps()
    layer = pool.shape[0] - 1
    pool_tri, pool_ref = pool.clone(), pool.clone()
    ops.write_kv(pool_tri, layer, k, v, meta)
    ref.write_kv(pool_ref, layer, k, v, meta)
    assert torch.equal(pool_tri, pool_ref), "write_kv differs from the reference"
    out = ops.attend(q, pool_ref, layer, meta, head_dim**-0.5)
    out_ref = ref.attend(q, pool_ref, layer, meta, head_dim**-0.5)
    err = rel_err(out, out_ref)
    assert err <= TOLERANCE[dtype], f"attend rel err {err:.2e}"


CPU_CASES = {
    # name: (decode context lengths, prefill (cached prefix, new tokens), H, n_kv, D, block_size, split_keys)
    "mha-d16-mixed": ([5, 37, 1, 70], [(0, 9), (13, 20), (3, 1)], 4, 4, 16, 4, None),
    "gqa4-d32-split": ([33, 2, 90], [(21, 17)], 8, 2, 32, 8, 16),
    "mqa-d64-split-prefill-only-blocks": ([130], [(0, 70), (64, 65)], 4, 1, 64, 16, 64),
    "odd-block-size": ([11, 29], [(7, 12)], 2, 1, 16, 3, 8),
    "decode-only-split": ([1, 64, 200, 17], [], 4, 2, 32, 16, 32),
    "prefill-only": ([], [(0, 33), (40, 5)], 4, 2, 16, 8, None),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_tiny_matches_reference(case):
    decode_lens, prefill, heads, kv_heads, head_dim, block_size, split = CPU_CASES[case]
    check_attention(decode_lens, prefill, heads, kv_heads, head_dim, block_size, torch.float32, DEVICE, seed=len(case),
                    ops=TritonAttentionOps(split_keys=split))  # fmt: skip


def test_write_kv_skips_negative_slots():
    pool, meta, q, k, v = make_attention_case([4, 9], [], 2, 2, 16, 4, torch.float32, DEVICE, seed=1)
    meta.slot_mapping[1] = -1
    before = pool.clone()
    TritonAttentionOps().write_kv(pool, 0, k, v, meta)
    changed = (pool != before).reshape(pool.shape[0], -1).any(dim=1)
    assert changed[0] and not changed[1:].any()
    page0 = int(meta.slot_mapping[0]) // 4
    assert torch.equal(pool[0, page0].view(2, 4, 2, 16)[0, int(meta.slot_mapping[0]) % 4], k[0])


def test_preconditions_raise_clear_errors():
    pool, meta, q, k, v = make_attention_case([4, 9], [(2, 3)], 4, 2, 16, 4, torch.float32, DEVICE, seed=2)
    ops = TritonAttentionOps()
    with pytest.raises(ValueError, match="head_dim"):
        ops.attend(torch.randn(q.shape[0], 4, 24, device=DEVICE), pool, 0, meta, 1.0)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ops.attend(torch.randn(q.shape[0], 3, 16, device=DEVICE), pool, 0, meta, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        ops.attend(q.double(), pool, 0, meta, 1.0)
    with pytest.raises(ValueError, match="page_elems"):
        ops.write_kv(pool, 0, k[:, :1].contiguous(), v[:, :1].contiguous(), meta)
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.write_kv(pool, 0, k[:2], v[:2], meta)
    with pytest.raises(ValueError, match="layer"):
        ops.attend(q, pool, 2, meta, 1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        TritonAttentionOps(capture=True)


# --- the full grid (GPU) ---------------------------------------------------------------------

GPU_HEADS = {  # name: (H, n_kv, D)
    "mha-d128": (32, 32, 128),
    "gqa4-d128": (32, 8, 128),
    "gqa8-d128": (64, 8, 128),
    "mha-d64": (16, 16, 64),
    "gqa8-d64": (32, 4, 64),
    "gqa4-d256": (8, 2, 256),
    "gqa2-d32": (8, 4, 32),
    "mqa-d16": (4, 1, 16),
}
GPU_BATCHES = {
    "decode-short": ([1, 7, 16, 33, 100, 250], []),
    "decode-long": ([4096, 1500, 2049, 3], []),
    "mixed": ([700, 5, 1200], [(0, 300), (512, 129), (1000, 1)]),
    "prefill-long": ([], [(0, 1024), (333, 700)]),
}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("batch", list(GPU_BATCHES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads", list(GPU_HEADS))
def test_gpu_grid_matches_reference(heads, dtype, batch):
    h, n_kv, d = GPU_HEADS[heads]
    decode_lens, prefill = GPU_BATCHES[batch]
    check_attention(decode_lens, prefill, h, n_kv, d, 16, dtype, "cuda", seed=h + d)

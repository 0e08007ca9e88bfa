"""Triton multi-LoRA shrink/expand against the torch reference (tiny cases anywhere, grid on GPU)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lorafleet.engine.ops.base import LoraBatch, LoraContext
from lorafleet.engine.ops.torch_ref import TorchLoraOps
from lorafleet.kernels import lora_kernels
from lorafleet.kernels.lora_ops import TritonLoraOps

from .conftest import DEVICE, requires_gpu
from .kernel_fixtures import GATE_UP, O_PROJ, POPULARITY, QKV, defined_entries, make_lora_case, make_spec
from .lora_checks import check_lora_case

TINY = make_spec(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128)
TINY_UNALIGNED = make_spec(hidden=40, heads=5, kv_heads=5, head_dim=8, intermediate=72)  # widths not multiples of 16


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_tiny_matches_reference(popularity, phase):
    ctx, num_tokens = make_lora_case(TINY, popularity, phase, (1, 3, 8, 16, 32), num_slots=6, num_requests=10,
                                     block_size=4, dtype=torch.float32, device=DEVICE, seed=POPULARITY.index(popularity) * 2 + (phase == "prefill"), max_prefill=24)  # fmt: skip
    check_lora_case(ctx, num_tokens, torch.float32, seed=5)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_unaligned_widths_and_pages(phase):
    # P = 2 * 4 * 40 = 320: rows of 40 and 72 elements straddle pages at every alignment.
    ctx, num_tokens = make_lora_case(TINY_UNALIGNED, "uniform", phase, (2, 5, 17), num_slots=4, num_requests=8,
                                     block_size=4, dtype=torch.float32, device=DEVICE, seed=11, max_prefill=20)  # fmt: skip
    check_lora_case(ctx, num_tokens, torch.float32, seed=6)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_rows_longer_than_a_page(phase):
    # block_size 1: P = 2 * 1 * 32 = 64 < 128-element rows (down_proj's A, gate/up's B^T): the
    # kernels walk a page cursor per row instead of loading two page ids once.
    ctx, num_tokens = make_lora_case(TINY, "skewed", phase, (1, 4, 16), num_slots=4, num_requests=8,
                                     block_size=1, dtype=torch.float32, device=DEVICE, seed=12, max_prefill=20)  # fmt: skip
    check_lora_case(ctx, num_tokens, torch.float32, seed=13)


WIDE = make_spec(hidden=512, heads=4, kv_heads=1, head_dim=128, intermediate=256)


@pytest.mark.parametrize("block_size", [4, 1], ids=["rows-in-two-pages", "rows-span-pages"])
def test_split_k_partial_sums(block_size):
    # One adapter, two tokens: a grid too small for the GPU, so decode shrink splits K (=512)
    # and adds float32 partial sums; P = 1024 or 256 covers both page-walk paths.
    ctx, num_tokens = make_lora_case(WIDE, "one", "decode", (3, 8), num_slots=2, num_requests=2,
                                     block_size=block_size, dtype=torch.float32, device=DEVICE, seed=21)  # fmt: skip
    check_lora_case(ctx, num_tokens, torch.float32, seed=22)


def test_capture_mode_with_padded_segments():
    """Static capacities: extra zero-length segments and a rank capacity above the batch's."""
    ctx, num_tokens = make_lora_case(TINY, "skewed", "decode", (1, 8, 16), num_slots=5, num_requests=12,
                                     block_size=4, dtype=torch.float32, device=DEVICE, seed=3)  # fmt: skip
    b = ctx.batch
    pad = 5
    zeros = torch.zeros(pad, dtype=torch.int32, device=DEVICE)
    padded = LoraBatch(
        token_slot=b.token_slot, seg_start=torch.cat([b.seg_start, zeros]), seg_len=torch.cat([b.seg_len, zeros]),
        seg_slot=torch.cat([b.seg_slot, zeros]), max_rank=32, max_seg_len=num_tokens, num_segments=b.num_segments + pad,
    )  # fmt: skip
    padded_ctx = LoraContext(ctx.pool, ctx.tables, padded)
    ops = TritonLoraOps(capture=True, max_rank=32)
    x = torch.randn(num_tokens, 64, device=DEVICE)
    u = ops.shrink(x, 0, QKV, padded_ctx)
    assert u.shape == (num_tokens, 3, 32)
    check_lora_case(ctx, num_tokens, torch.float32, seed=7, ops=_SameBatchOps(ops, padded))


@pytest.mark.parametrize("spec,block_size", [(TINY, 4), (WIDE, 1)], ids=["rows-in-two-pages", "rows-span-pages"])
def test_capture_capacity_above_small_ranks(spec, block_size):
    """Capacity 64 (as graphs capture) over ranks 4 and 16 (expand's small-rank tiles) and 17 and
    64 (the capacity's tiles) in one batch, both page-walk paths (P = 256: WIDE's 512-wide B^T
    rows of o/down span pages)."""
    from lorafleet.kernels.lora_tiles import choose_tiles

    tiles = choose_tiles(64, True, 256)
    assert tiles.expand_small_r == 16 < tiles.expand_block_r and tiles.expand_small_n > tiles.expand_block_n
    ctx, num_tokens = make_lora_case(spec, "uniform", "decode", (4, 16, 17, 64), num_slots=5, num_requests=12,
                                     block_size=block_size, dtype=torch.float32, device=DEVICE, seed=31)  # fmt: skip
    assert ctx.pool.shape[2] == 256
    ops = TritonLoraOps(capture=True, max_rank=64)
    check_lora_case(ctx, num_tokens, torch.float32, seed=32, ops=_SameBatchOps(ops, ctx.batch))


class _SameBatchOps:
    """Runs `ops` on the padded static batch whatever context the check passes."""

    def __init__(self, ops: TritonLoraOps, batch: LoraBatch) -> None:
        self.ops, self.batch, self.max_rank = ops, batch, ops.max_rank

    def shrink(self, x, layer, modules, ctx):
        return self.ops.shrink(x, layer, modules, LoraContext(ctx.pool, ctx.tables, self.batch))

    def expand(self, y, u, layer, modules, offsets, ctx):
        self.ops.expand(y, u, layer, modules, offsets, LoraContext(ctx.pool, ctx.tables, self.batch))


# bf16 on GPUs only: the Triton interpreter's bf16 dot gives garbage (~3e10 where torch gives 7).
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, requires_gpu]), torch.float16],
                         ids=["bf16", "fp16"])
def test_expand_of_float32_u_equals_expand_of_its_cast(dtype):
    """Split-K shrink hands expand a float32 u (no cast node between them): expand must round it
    to y's dtype as it loads it, so the result is bit for bit that of the cast (kernel and
    reference), and shrink's float32 u must be what the reference computes."""
    device = "cuda" if dtype == torch.bfloat16 else DEVICE
    ctx, num_tokens = make_lora_case(TINY, "uniform", "decode", (3, 8, 16), num_slots=3, num_requests=6,
                                     block_size=4, dtype=dtype, device=device, seed=5)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(3)
    ops = TritonLoraOps()
    u32 = torch.randn(num_tokens, 3, 16, generator=gen, device=device)
    y0 = torch.randn(num_tokens, 128, generator=gen, device=device).to(dtype)
    for impl in (ops, TorchLoraOps()):
        got, want = y0.clone(), y0.clone()
        impl.expand(got, u32, 0, QKV, (0, 64, 96), ctx)
        impl.expand(want, u32.to(dtype), 0, QKV, (0, 64, 96), ctx)
        assert torch.equal(got, want), type(impl).__name__
        assert not torch.equal(got, y0)
    x = torch.randn(num_tokens, 64, generator=gen, device=device).to(dtype)
    u = ops.shrink(x, 0, QKV, ctx)
    assert u.dtype in (dtype, torch.float32)
    u_ref = TorchLoraOps().shrink(x, 0, QKV, ctx)
    u = torch.where(defined_entries(ctx, 0, QKV, u.shape[2]), u, 0)  # the entries shrink defines
    assert torch.allclose(u[:, :, : u_ref.shape[2]].to(dtype).float(), u_ref.float(), rtol=2e-2, atol=2e-2)


def test_batch_without_adapter_launches_nothing(monkeypatch):
    ctx, num_tokens = make_lora_case(TINY, "none", "decode", (8,), num_slots=2, num_requests=6,
                                     block_size=4, dtype=torch.float32, device=DEVICE, seed=4)  # fmt: skip

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for a batch without adapters")

    for name in ("lora_plan_kernel", "lora_shrink_kernel", "lora_expand_kernel"):
        monkeypatch.setattr(lora_kernels, name, NoLaunch())
    ops = TritonLoraOps()
    monkeypatch.setattr("lorafleet.kernels.lora_ops.check_kernel_runnable", lambda kernel, device: None)
    u = ops.shrink(torch.randn(num_tokens, 64, device=DEVICE), 0, QKV, ctx)
    assert u.shape == (num_tokens, 3, 1)  # nothing in it is defined: no adapter
    y = torch.randn(num_tokens, 128, device=DEVICE)
    ops.expand(y.clone(), u, 0, QKV, (0, 64, 96), ctx)


def test_preconditions_raise_clear_errors():
    ctx, num_tokens = make_lora_case(TINY, "uniform", "decode", (8,), num_slots=2, num_requests=4,
                                     block_size=4, dtype=torch.float32, device=DEVICE, seed=8)  # fmt: skip
    ops = TritonLoraOps()
    x = torch.randn(num_tokens, 64, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        ops.shrink(x.double(), 0, QKV, ctx)
    with pytest.raises(ValueError, match="in_features"):
        ops.shrink(torch.randn(num_tokens, 128, device=DEVICE), 0, QKV, ctx)
    with pytest.raises(ValueError, match="layer"):
        ops.shrink(x, 5, QKV, ctx)
    with pytest.raises(ValueError, match="modules fused"):
        ops.shrink(x, 0, QKV + GATE_UP, ctx)
    u = ops.shrink(x, 0, QKV, ctx)
    with pytest.raises(ValueError, match="past N"):
        ops.expand(torch.randn(num_tokens, 100, device=DEVICE), u, 0, QKV, (0, 64, 96), ctx)
    with pytest.raises(ValueError, match="u must be"):
        ops.expand(torch.randn(num_tokens, 128, device=DEVICE), u[:, :2], 0, QKV, (0, 64, 96), ctx)
    with pytest.raises(ValueError, match="out_offsets"):
        ops.expand(torch.randn(num_tokens, 128, device=DEVICE), u[:, :1].contiguous(), 0, O_PROJ, (0, 64), ctx)
    with pytest.raises(ValueError, match="max_rank"):
        TritonLoraOps(capture=True)



def test_ops_keep_no_reference_to_activations():
    """The ops check their operands on every call and hold on to none of them: a cache keyed by
    tensors kept every activation of a run alive (13 GiB at CUDA-graph capture of a 7B model)."""
    ctx, num_tokens = make_lora_case(TINY, "uniform", "decode", (8,), num_slots=2, num_requests=4,
                                     block_size=4, dtype=torch.float32, device=DEVICE, seed=8)  # fmt: skip
    ops = TritonLoraOps()
    x, y = torch.randn(num_tokens, 64, device=DEVICE), torch.randn(num_tokens, 128, device=DEVICE)
    u = ops.shrink(x, 0, QKV, ctx)
    ops.expand(y, u, 0, QKV, (0, 64, 96), ctx)
    refs = [weakref.ref(t) for t in (x, y, u)]
    del x, y, u
    gc.collect()
    assert all(r() is None for r in refs), "an activation passed to the LoRA ops is still referenced"
    bad = torch.randn(num_tokens, 64, dtype=torch.float64, device=DEVICE)
    for _ in range(2):  # the same tensor is checked again, not waved through from a cache
        with pytest.raises(ValueError, match="dtype"):
            ops.shrink(bad, 0, QKV, ctx)


def test_ops_take_a_batch_made_under_inference_mode():
    """The TP workers build each step's LoraBatch under torch.inference_mode: inference tensors
    have no version counter, and reading it raised (the W = 2 engine on H200s at 897744e)."""
    ctx, num_tokens = make_lora_case(TINY, "uniform", "prefill", (8,), num_slots=2, num_requests=3,
                                     block_size=4, dtype=torch.float32, device=DEVICE, seed=9)  # fmt: skip
    x, y = torch.randn(num_tokens, 64, device=DEVICE), torch.randn(num_tokens, 128, device=DEVICE)
    expected_u = TritonLoraOps().shrink(x, 0, QKV, ctx)
    expected_y = y.clone()
    TritonLoraOps().expand(expected_y, expected_u, 0, QKV, (0, 64, 96), ctx)
    with torch.inference_mode():
        b = ctx.batch
        batch = LoraBatch(*(t.clone() for t in (b.token_slot, b.seg_start, b.seg_len, b.seg_slot)),
                          max_rank=b.max_rank, max_seg_len=b.max_seg_len, num_segments=b.num_segments)
        assert batch.seg_len.is_inference()
        inf_ctx = LoraContext(ctx.pool, ctx.tables, batch)
        ops, got_y = TritonLoraOps(), y.clone()
        u = ops.shrink(x, 0, QKV, inf_ctx)
        ops.expand(got_y, u, 0, QKV, (0, 64, 96), inf_ctx)
    defined = defined_entries(ctx, 0, QKV, u.shape[2])
    assert torch.equal(u[defined], expected_u[defined]) and torch.equal(got_y, expected_y)


# --- the full grid (GPU) ---------------------------------------------------------------------

GPU_SHAPES = {
    "h64-gqa-kv16": make_spec(hidden=64, heads=4, kv_heads=1, head_dim=16, intermediate=128),
    "llama7b": make_spec(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008),
    "llama8b-gqa": make_spec(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336),
    "h8192-gqa": make_spec(hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672),
}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_grid_matches_reference(shape, dtype, popularity, phase):
    spec = GPU_SHAPES[shape]
    num_requests = 48 if phase == "decode" else 12
    ctx, num_tokens = make_lora_case(spec, popularity, phase, (1, 3, 8, 16, 64, 128), num_slots=6, num_requests=num_requests,
                                     block_size=16, dtype=dtype, device="cuda", seed=17, max_prefill=300)  # fmt: skip
    check_lora_case(ctx, num_tokens, dtype, seed=9)

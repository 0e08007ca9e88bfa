"""A decode step (LoRA shrink + expand on q/k/v, write_kv, paged attention) captured once in a
CUDA graph over fixed-size buffers, then replayed with other batches and adapter mixes."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.ops.base import AttentionMeta, LoraBatch, LoraContext
from lorafleet.engine.ops.torch_ref import TorchAttentionOps, TorchLoraOps
from lorafleet.kernels.attention_ops import TritonAttentionOps
from lorafleet.kernels.lora_ops import TritonLoraOps

from .conftest import requires_gpu
from .kernel_fixtures import (
    QKV,
    defined_entries,
    make_adapter_tables,
    make_lora_batch,
    make_spec,
    random_slot_ranks,
    rel_err,
    request_slots,
)

T_CAP, G_CAP, R_CAP, SEQ_CAP, BLOCK = 32, 32, 64, 512, 16
LAYER = 1
TOL = 2e-2  # bf16


@pytest.mark.gpu
@requires_gpu
def test_decode_step_capture_and_replay():
    dev, dtype = "cuda", torch.bfloat16
    spec = make_spec(hidden=1024, heads=8, kv_heads=2, head_dim=128, intermediate=2816)
    gen = torch.Generator().manual_seed(0)
    max_blocks = SEQ_CAP // BLOCK
    pool, tables = make_adapter_tables(spec, random_slot_ranks(8, (1, 8, 16, 64), gen), BLOCK, dtype, dev, gen,
                                       spare_pages=T_CAP * max_blocks)  # fmt: skip
    adapter_pages = set(tables.page_table[tables.page_table >= 0].tolist())
    kv_pages = torch.tensor([p for p in range(pool.shape[1]) if p not in adapter_pages])
    widths = [tables.module_shapes[m][1] for m in QKV]
    offsets = tuple(sum(widths[:i]) for i in range(3))

    # Static buffers, sized once.
    i32 = dict(dtype=torch.int32, device=dev)
    x = torch.empty(T_CAP, spec.hidden_size, dtype=dtype, device=dev)
    y_base = torch.empty(T_CAP, sum(widths), dtype=dtype, device=dev)
    q = torch.empty(T_CAP, spec.num_heads, spec.head_dim, dtype=dtype, device=dev)
    k = torch.empty(T_CAP, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=dev)
    v = torch.empty_like(k)
    batch = LoraBatch(token_slot=torch.empty(T_CAP, **i32), seg_start=torch.empty(G_CAP, **i32), seg_len=torch.empty(G_CAP, **i32),
                      seg_slot=torch.empty(G_CAP, **i32), max_rank=R_CAP, max_seg_len=T_CAP, num_segments=G_CAP)  # fmt: skip
    meta = AttentionMeta(query_start=torch.arange(T_CAP + 1, **i32), seq_lens=torch.empty(T_CAP, **i32),
                         block_tables=torch.empty(T_CAP, max_blocks, **i32), slot_mapping=torch.empty(T_CAP, dtype=torch.int64, device=dev),
                         num_decodes=T_CAP, max_query_len=1, max_seq_len=SEQ_CAP, block_size=BLOCK)  # fmt: skip
    ctx = LoraContext(pool, tables, batch)
    lora = TritonLoraOps(capture=True, max_rank=R_CAP)
    attn = TritonAttentionOps(capture=True, max_seq_len=SEQ_CAP)
    scale = spec.head_dim**-0.5

    def step():
        u = lora.shrink(x, LAYER, QKV, ctx)
        y = y_base.clone()
        lora.expand(y, u, LAYER, QKV, offsets, ctx)
        attn.write_kv(pool, LAYER, k, v, meta)
        return u, y, attn.attend(q, pool, LAYER, meta, scale)

    def fill(popularity: str, num_real: int):
        """Write a new batch into the static buffers; returns the reference's (real-only) metadata."""
        real, _ = make_lora_batch(request_slots(popularity, num_real, tables.page_table.shape[0], gen), [1] * num_real, tables, dev, gen)
        g = real.num_segments
        batch.seg_len.zero_()
        batch.seg_start.zero_()
        batch.seg_slot.zero_()
        batch.seg_start[:g], batch.seg_len[:g], batch.seg_slot[:g] = real.seg_start, real.seg_len, real.seg_slot
        batch.token_slot.fill_(-1)
        batch.token_slot[:num_real] = real.token_slot
        for t in (x, y_base, q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
        seq_lens = torch.randint(1, SEQ_CAP + 1, (num_real,), generator=gen)
        pages = kv_pages[torch.randperm(len(kv_pages), generator=gen)]
        tables_real = torch.full((num_real, max_blocks), -1, dtype=torch.int32)
        used = 0
        for b, s in enumerate(seq_lens.tolist()):
            n = -(-s // BLOCK)
            tables_real[b, :n] = pages[used : used + n].to(torch.int32)
            used += n
        last = seq_lens - 1
        slots = tables_real[torch.arange(num_real), last // BLOCK].long() * BLOCK + last % BLOCK
        meta.seq_lens.zero_()
        meta.seq_lens[:num_real] = seq_lens.to(dev, torch.int32)
        meta.block_tables.fill_(-1)
        meta.block_tables[:num_real] = tables_real.to(dev)
        meta.slot_mapping.fill_(-1)
        meta.slot_mapping[:num_real] = slots.to(dev)
        real_meta = AttentionMeta(meta.query_start[: num_real + 1].clone(), meta.seq_lens[:num_real].clone(), meta.block_tables[:num_real].clone(),
                                  meta.slot_mapping[:num_real].clone(), num_real, 1, int(seq_lens.max()), BLOCK)  # fmt: skip
        return real, real_meta

    fill("uniform", T_CAP)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # compile every kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises if any launch path syncs with the host
        u_out, y_out, o_out = step()

    for trial, (popularity, num_real) in enumerate([("distinct", 32), ("uniform", 17), ("skewed", 9), ("one", 23), ("none", 5), ("distinct", 1)]):
        real, real_meta = fill(popularity, num_real)
        pool_before = pool.clone()
        graph.replay()
        torch.cuda.synchronize()
        n = num_real
        # LoRA
        real_ctx = LoraContext(pool_before, tables, real)
        u_ref = TorchLoraOps().shrink(x[:n], LAYER, QKV, real_ctx)
        r = u_ref.shape[2]
        # only the real tokens' entries below their ranks are defined (LoraOps.shrink)
        u_got = torch.where(defined_entries(real_ctx, LAYER, QKV, u_out.shape[2])[:n], u_out[:n], 0)[:, :, :r]
        if u_ref.any():
            assert rel_err(u_got, u_ref) <= TOL, f"trial {trial}: shrink"
        y_ref = y_base[:n].clone()
        TorchLoraOps().expand(y_ref, u_ref, LAYER, QKV, offsets, real_ctx)
        assert torch.equal(y_out[n:], y_base[n:]), f"trial {trial}: expand touched padding tokens"
        delta = (y_ref.double() - y_base[:n].double()).norm()
        if delta > 0:
            assert float((y_out[:n].double() - y_ref.double()).norm() / delta) <= TOL, f"trial {trial}: expand"
        else:
            assert torch.equal(y_out[:n], y_base[:n])
        # Attention
        ref = TorchAttentionOps()
        ref.write_kv(pool_before, LAYER, k[:n], v[:n], real_meta)
        assert torch.equal(pool, pool_before), f"trial {trial}: write_kv"
        o_ref = ref.attend(q[:n], pool_before, LAYER, real_meta, scale)
        assert rel_err(o_out[:n], o_ref) <= TOL, f"trial {trial}: attention"
        assert torch.isfinite(o_out).all()

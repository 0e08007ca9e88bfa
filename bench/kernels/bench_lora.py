"""LoRA shrink/expand microbenchmarks on a Llama-7B layer (hidden 4096, intermediate 11008).

Decode: 1..512 tokens, 1..512 distinct adapters, ranks 8 and 64, against the torch reference and
S-LoRA's padded-rank bmm baseline. Prefill: 1..64 segments of 128..2048 tokens against a dense
matmul of the same FLOPs. Bytes counted are what the op must move: x/u/y once, each distinct
adapter's matrices once.
"""

from __future__ import annotations

import torch

from lorafleet.bench.kernels.common import Row, time_graph_ms, time_ms
from lorafleet.engine.ops.base import LoraContext
from lorafleet.engine.ops.torch_ref import TorchLoraOps, read_lora_matrix
from lorafleet.kernels.lora_ops import TritonLoraOps
from tests.kernels.kernel_fixtures import DOWN, GATE_UP, QKV, make_adapter_tables, make_lora_batch, make_spec

SPEC = make_spec(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, layers=1)
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODE = [(1, 1), (8, 1), (8, 8), (64, 1), (64, 8), (64, 64), (256, 16), (256, 256), (512, 1), (512, 32), (512, 512)]
PREFILL = [(1, 128), (1, 2048), (4, 512), (16, 128), (16, 2048), (64, 128), (64, 512), (64, 2048)]
GROUPS = {"qkv": QKV, "gate_up": GATE_UP, "down": DOWN}
BF16 = 2
DEVICE, DTYPE = "cuda", torch.bfloat16  # module constants so a CPU dry run can swap them


def _bytes_flops(kind: str, modules, rank: int, tokens: int, adapters: int, tables) -> tuple[float, float]:
    k = tables.module_shapes[modules[0]][0]
    outs = [tables.module_shapes[m][1] for m in modules]
    n = len(modules)
    if kind == "shrink":
        moved = tokens * k + adapters * n * rank * k + tokens * n * rank
        return moved * BF16, 2.0 * tokens * k * rank * n
    moved = tokens * n * rank + adapters * rank * sum(outs) + 2 * tokens * sum(outs)
    return moved * BF16, 2.0 * tokens * rank * sum(outs)


class PaddedBmm:
    """S-LoRA's "bmm" baseline: adapters copied to dense [G, K, R] / [G, R, N] tensors padded to the
    largest rank, gathered per token, then torch.bmm (the copy into dense tensors is not timed)."""

    def __init__(self, ctx: LoraContext, modules, num_adapters: int, rank_cap: int) -> None:
        self.modules = modules
        self.a, self.b = [], []
        for m in modules:
            k, n = ctx.tables.module_shapes[m]
            a = torch.zeros(num_adapters, k, rank_cap, dtype=ctx.pool.dtype, device=ctx.pool.device)
            b = torch.zeros(num_adapters, rank_cap, n, dtype=ctx.pool.dtype, device=ctx.pool.device)
            for s in range(num_adapters):
                ra = read_lora_matrix(ctx, s, 0, m, "a")  # [r, K]
                a[s, :, : ra.shape[0]] = ra.T
                b[s, : ra.shape[0]] = read_lora_matrix(ctx, s, 0, m, "b")
            self.a.append(a), self.b.append(b)
        self.scales = ctx.tables.scales[:num_adapters, 0].to(ctx.pool.dtype)  # [G, 7]

    def shrink(self, x, token_slot):
        idx = token_slot.long()
        return torch.cat([torch.bmm(x.unsqueeze(1), a[idx]) for a in self.a], dim=1)  # [T, n, R]

    def expand(self, y, u, token_slot, offsets):
        idx = token_slot.long()
        for i, (m, b, off) in enumerate(zip(self.modules, self.b, offsets)):
            d = torch.bmm(u[:, i : i + 1], b[idx]).squeeze(1) * self.scales[idx, m, None]
            y[:, off : off + b.shape[2]] += d


def run(ceilings: dict, quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    for rank in (8, 64):
        pool, tables = make_adapter_tables(SPEC, [dict.fromkeys(ALL_MODULES, rank)] * 512, 16, DTYPE, DEVICE, gen)
        tables.ranks[:, :, :] = rank  # layer 0 only; every module at the full rank
        rows += _decode(pool, tables, rank, gen, ceilings, quick)
        rows += _prefill(pool, tables, rank, gen, ceilings, quick)
        del pool, tables
        torch.cuda.empty_cache()
    return rows


def _timed(impl: str, fn) -> float:
    if impl == "torch_ref":  # host loops and syncs: not capturable
        return time_ms(fn, rep=20)
    return time_ms(fn) if impl == "triton_eager" else time_graph_ms(fn)


def _decode(pool, tables, rank, gen, ceilings, quick) -> list[Row]:
    rows = []
    base_ctx = LoraContext(pool, tables, None)
    bmm = PaddedBmm(base_ctx, QKV, 512, rank)
    ops, ref = TritonLoraOps(), TorchLoraOps()
    for tokens, adapters in DECODE[::3] if quick else DECODE:
        slots = [i % adapters for i in range(tokens)]
        batch, _ = make_lora_batch(slots, [1] * tokens, tables, DEVICE, gen)
        ctx = LoraContext(pool, tables, batch)
        cfg = {"tokens": tokens, "adapters": adapters, "rank": rank}
        for group, modules in GROUPS.items():
            k = tables.module_shapes[modules[0]][0]
            outs = [tables.module_shapes[m][1] for m in modules]
            offsets = tuple(sum(outs[:i]) for i in range(len(modules)))
            x = torch.randn(tokens, k, device=DEVICE, dtype=DTYPE)
            y = torch.randn(tokens, sum(outs), device=DEVICE, dtype=DTYPE)
            u = ops.shrink(x, 0, modules, ctx)
            impls = {"triton": (lambda: ops.shrink(x, 0, modules, ctx), lambda: ops.expand(y, u, 0, modules, offsets, ctx))}
            if group == "qkv":
                impls["bmm_padded"] = (lambda: bmm.shrink(x, batch.token_slot), lambda: bmm.expand(y, u, batch.token_slot, offsets))
                if adapters <= 64:
                    impls["torch_ref"] = (lambda: ref.shrink(x, 0, modules, ctx), lambda: ref.expand(y, u, 0, modules, offsets, ctx))
            impls["triton_eager"] = impls["triton"]
            for impl, (shrink_fn, expand_fn) in impls.items():
                for kind, fn in (("shrink", shrink_fn), ("expand", expand_fn)):
                    nbytes, flops = _bytes_flops(kind, modules, rank, tokens, adapters, tables)
                    ms = _timed(impl, fn)
                    rows.append(Row("lora_decode", {**cfg, "op": f"{kind}_{group}"}, impl, ms, nbytes, flops).finish(ceilings))
    return rows


def _prefill(pool, tables, rank, gen, ceilings, quick) -> list[Row]:
    rows = []
    ops, ref = TritonLoraOps(), TorchLoraOps()
    for segments, length in PREFILL[::3] if quick else PREFILL:
        tokens = segments * length
        batch, _ = make_lora_batch(list(range(segments)), [length] * segments, tables, DEVICE, gen)
        ctx = LoraContext(pool, tables, batch)
        cfg = {"segments": segments, "seg_len": length, "tokens": tokens, "rank": rank}
        modules = QKV
        k, outs = tables.module_shapes[modules[0]][0], [tables.module_shapes[m][1] for m in modules]
        offsets = tuple(sum(outs[:i]) for i in range(3))
        x = torch.randn(tokens, k, device=DEVICE, dtype=DTYPE)
        y = torch.randn(tokens, sum(outs), device=DEVICE, dtype=DTYPE)
        u = ops.shrink(x, 0, modules, ctx)
        a_cat = torch.randn(k, 3 * rank, device=DEVICE, dtype=DTYPE)
        b_cat = torch.randn(rank, sum(outs), device=DEVICE, dtype=DTYPE)
        u2 = u[:, 0].contiguous()
        impls = {
            "triton": (lambda: ops.shrink(x, 0, modules, ctx), lambda: ops.expand(y, u, 0, modules, offsets, ctx)),
            "dense_matmul": (lambda: x @ a_cat, lambda: y.addmm_(u2, b_cat)),
        }
        if segments <= 16:
            impls["torch_ref"] = (lambda: ref.shrink(x, 0, modules, ctx), lambda: ref.expand(y, u, 0, modules, offsets, ctx))
        impls["triton_eager"] = impls["triton"]
        for impl, (shrink_fn, expand_fn) in impls.items():
            for kind, fn in (("shrink", shrink_fn), ("expand", expand_fn)):
                nbytes, flops = _bytes_flops(kind, modules, rank, tokens, segments, tables)
                ms = _timed(impl, fn)
                rows.append(Row("lora_prefill", {**cfg, "op": f"{kind}_qkv"}, impl, ms, nbytes, flops).finish(ceilings))
    return rows

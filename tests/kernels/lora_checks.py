"""One LoRA case checked end to end: Triton shrink/expand against the torch reference, every
fused module group, first and last layer, plus the rows and columns that must stay untouched.

Shrink defines u[t, i, :r] of tokens with an adapter only (LoraOps.shrink); expand must read
nothing else: it gets u with every other entry poisoned (NaN), and must still match."""

from __future__ import annotations

import torch

from lorafleet.engine.ops.base import LoraContext
from lorafleet.engine.ops.torch_ref import TorchLoraOps
from lorafleet.kernels.lora_ops import TritonLoraOps

from .kernel_fixtures import DOWN, GATE_UP, O_PROJ, QKV, defined_entries, rel_err

# ||out - ref|| / ||ref|| bounds: outputs are rounded to the dtype on both sides (fp32 accumulation)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GROUPS = (QKV, GATE_UP, O_PROJ, DOWN)


def check_lora_case(ctx: LoraContext, num_tokens: int, dtype, seed: int, ops: TritonLoraOps | None = None) -> None:
    ops = ops or TritonLoraOps()
    ref = TorchLoraOps()
    gen = torch.Generator(device=ctx.pool.device).manual_seed(seed)
    device, tol = ctx.pool.device, TOLERANCE[dtype]
    no_adapter = ctx.batch.token_slot < 0  # [T]
    for layer in (0, ctx.pool.shape[0] - 1):
        for modules in GROUPS:
            k = ctx.tables.module_shapes[modules[0]][0]
            x = torch.randn(num_tokens, k, generator=gen, device=device).to(dtype)
            u = ops.shrink(x, layer, modules, ctx)
            u_ref = ref.shrink(x, layer, modules, ctx)
            r_ref = u_ref.shape[2]
            assert u.shape[:2] == u_ref.shape[:2] and u.shape[2] >= r_ref, (u.shape, u_ref.shape)
            defined = defined_entries(ctx, layer, modules, u.shape[2])  # [T, M, R]
            u = torch.where(defined, u, 0)[:, :, :r_ref]  # compared where defined (the reference is 0 elsewhere)
            if u_ref.any():
                err = rel_err(u, u_ref)
                assert err <= tol, f"shrink layer {layer} modules {modules}: rel err {err:.2e} > {tol:.0e}"
            else:
                assert not u.any()

            widths = [ctx.tables.module_shapes[m][1] for m in modules]
            lead = 7 if layer == 0 else 16  # odd start (scalar y access) or 16-aligned (vector y access)
            offsets = tuple(lead + sum(widths[:i]) for i in range(len(modules)))  # spare columns both sides
            y0 = (torch.randn(num_tokens, sum(widths) + 32, generator=gen, device=device) * 2).to(dtype)
            y, y_ref = y0.clone(), y0.clone()
            u_in = u_ref if ops.max_rank is None else _pad_rank(u_ref, ops.max_rank)
            poisoned = torch.where(defined_entries(ctx, layer, modules, u_in.shape[2]), u_in, float("nan"))
            ops.expand(y, poisoned, layer, modules, offsets, ctx)
            ref.expand(y_ref, u_ref, layer, modules, offsets, ctx)
            assert torch.equal(y[no_adapter], y0[no_adapter]), "expand touched rows of tokens without adapter"
            assert torch.equal(y[:, :lead], y0[:, :lead]) and torch.equal(y[:, lead + sum(widths) :], y0[:, lead + sum(widths) :])
            delta_ref = y_ref.double() - y0.double()
            if delta_ref.norm() > 0:
                err = float((y.double() - y_ref.double()).norm() / delta_ref.norm())
                assert err <= tol, f"expand layer {layer} modules {modules}: rel err {err:.2e} > {tol:.0e}"
            else:
                assert torch.equal(y, y0)


def _pad_rank(u: torch.Tensor, rank_cap: int) -> torch.Tensor:
    out = torch.zeros(u.shape[0], u.shape[1], rank_cap, dtype=u.dtype, device=u.device)
    out[:, :, : u.shape[2]] = u
    return out

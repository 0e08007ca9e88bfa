"""One rank's LoRA read straight from its pool pages (RankRunner.load_adapter, then a LoraStep:
the engine's LoraOps on the rank's tables) equals the plain-torch math over the same rank's shares
(lora_math over shard_lora), for every scheme, rank and module group. No collectives are made
here: shrink and expand are checked on their own, as each rank runs them between collectives.

Ops: the torch reference ops, and the Triton kernels (on the GPU when there is one, else under
the Triton interpreter on the CPU), so the GPU path's table and page arithmetic is tested in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafleet.engine.memory.layout import PoolGeometry
from lorafleet.engine.model import DOWN, GATE_UP, QKV, O
from lorafleet.engine.ops.torch_ref import TorchAttentionOps, TorchLoraOps
from lorafleet.engine.tp.collectives import TpComm
from lorafleet.engine.tp.partition import local_spec, make_plan, piece_width
from lorafleet.engine.tp.rank_runner import RankRunner, adapter_pages
from lorafleet.engine.tp.rank_tables import segments
from lorafleet.engine.tp.shard_adapters import Scheme, shard_lora
from lorafleet.engine.tp.shard_weights import shard_model
from lorafleet.engine.weights_loader import random_weights
from lorafleet.formats.lora_weights import LoraWeights
from tests.tp.cases import ADAPTER_RANKS, SCHEMES, TOKEN_ADAPTER, make_adapter, make_spec
from tests.kernels.kernel_fixtures import defined_entries
from tests.tp.lora_math import TpLoraBatch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
REPO = Path(__file__).resolve().parents[2]


def _triton_ops():
    # On the CPU this runs in a fresh interpreter started with TRITON_INTERPRET=1 (see
    # test_triton_kernels_on_rank_shares): the flag must be set before triton is first imported.
    from lorafleet.kernels.lora_ops import TritonLoraOps

    return TritonLoraOps(), TritonLoraOps()


def _on_device(w: LoraWeights) -> LoraWeights:
    return LoraWeights(w.config, {k: v.to(DEVICE) for k, v in w.a.items()}, {k: v.to(DEVICE) for k, v in w.b.items()})


def _runner(name: str, world: int, rank: int, scheme: str, ops: str, dtype: torch.dtype):
    spec = make_spec(name)
    plan = make_plan(spec, world, rank)
    weights = shard_model(random_weights(spec, dtype, DEVICE, seed=3), spec, plan)
    page_elems = PoolGeometry.for_model(local_spec(spec, world), 1, 16).page_elems
    pool = torch.zeros(spec.num_layers, 96, page_elems, dtype=dtype, device=DEVICE)
    lora_ops = (TorchLoraOps(), TorchLoraOps()) if ops == "torch" else _triton_ops()
    runner = RankRunner(spec, plan, weights, TorchAttentionOps(), TpComm(world, rank), pool, Scheme(scheme), lora_ops)
    adapters = [_on_device(make_adapter(spec, ranks, seed=20 + i)) for i, ranks in enumerate(ADAPTER_RANKS)]
    slots, next_page = [], 5
    for i, ad in enumerate(adapters):  # slots and pages out of order, as the driver hands them out
        n = adapter_pages(spec, ad.config.ranks_by_module(), world, Scheme(scheme), page_elems)
        slot = 70 - 3 * i  # > 64: the tables grow
        runner.load_adapter(slot, list(range(next_page + n - 1, next_page - 1, -1)), ad.config.ranks_by_module(),
                            list(ad.config.targets), ad.a, ad.b)
        slots.append(slot)
        next_page += n + 1
    return spec, plan, runner, adapters, slots


# Every rank under the torch ops; the Triton kernels (slow under the interpreter) on a last rank
# each: W = 2 of mha, and W = 4 of gqa (replicated KV heads; rank-1 adapters leave it no A rows).
CASES = [(n, w, r, s) for n in ("mha", "gqa") for w in (2, 4) for r in range(w) for s in SCHEMES]
TRITON_CASES = [(n, w, w - 1, s) for n, w in (("mha", 2), ("gqa", 4)) for s in SCHEMES]


@pytest.mark.parametrize("name,world,rank,scheme", CASES, ids=[f"{n}-W{w}r{r}-{s}" for n, w, r, s in CASES])
def test_rank_lora_step_equals_share_math(name, world, rank, scheme):
    check_case(name, world, rank, scheme, "torch")


@pytest.mark.timeout(300)
def test_triton_kernels_on_rank_shares():
    if HAS_CUDA:
        run_triton_cases()
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the child's environment only
    proc = subprocess.run([sys.executable, "-c", "import tests.tp.test_rank_tables as t; t.run_triton_cases()"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("ok ") == len(TRITON_CASES), proc.stdout


def run_triton_cases() -> None:
    for case in TRITON_CASES:
        check_case(*case, "triton")
        print("ok", *case, flush=True)


def check_case(name: str, world: int, rank: int, scheme: str, ops: str) -> None:
    dtype = torch.float32
    spec, plan, runner, adapters, slots = _runner(name, world, rank, scheme, ops, dtype)
    token_adapter = torch.tensor(TOKEN_ADAPTER, device=DEVICE)
    token_slot = torch.tensor([slots[a] if a >= 0 else -1 for a in TOKEN_ADAPTER], dtype=torch.int32, device=DEVICE)
    batch = runner.tables.batch_of(token_slot)
    paged = runner.tables.lora_step(runner.pool, batch, runner.shrink_ops, runner.expand_ops)
    ref = TpLoraBatch(token_adapter, [shard_lora(ad, plan, scheme) for ad in adapters])
    assert (paged.scheme, paged.max_rank, paged.empty, batch.targets) == (ref.scheme, ref.max_rank, False, ref.targets)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    T, R, sch = len(TOKEN_ADAPTER), ref.max_rank, Scheme(scheme)
    q_loc, kv_loc, i_loc = plan.heads_per_rank * spec.head_dim, plan.kv_heads_per_rank * spec.head_dim, \
        spec.intermediate_size // world
    groups = [  # (modules, shrink input width, shrink width, expand width, y width, out offsets)
        (QKV, spec.hidden_size, None, None, q_loc + 2 * kv_loc, (0, q_loc, q_loc + kv_loc)),
        (GATE_UP, spec.hidden_size, None, None, 2 * i_loc, (0, i_loc)),
    ]
    for module, full_in in ((O, spec.q_width), (DOWN, spec.intermediate_size)):
        k = full_in if sch.whole_row_a else full_in // world
        off = 0 if sch.whole_row_b else plan.hidden_cols.start
        groups.append((module, k, R, R, spec.hidden_size, (off,)))
    for modules, k, w_shrink, w_expand, n_out, offsets in groups:
        if w_shrink is None:  # column-parallel: slora holds strided rank rows, padded to p
            w_shrink = piece_width(R, world) if sch.splits_column_rank else R
            w_expand = w_shrink * world if sch.splits_column_rank else R
        x = torch.randn(T, k, generator=g, device=DEVICE, dtype=dtype)
        got, want = paged.shrink(x, 0, modules, w_shrink), ref.shrink(x, 0, modules, w_shrink)
        defined = defined_entries(paged.shrink_ctx, 0, modules, w_shrink)  # the rest is undefined (LoraOps.shrink)
        torch.testing.assert_close(torch.where(defined, got, 0), want, rtol=1e-4, atol=1e-4, msg=f"shrink {modules}")
        u = torch.randn(T, len(modules), w_expand, generator=g, device=DEVICE, dtype=dtype)
        y0 = torch.randn(T, n_out, generator=g, device=DEVICE, dtype=dtype)
        y_got, y_want = y0.clone(), y0.clone()
        paged.expand(y_got, u, 0, modules, offsets)
        ref.expand(y_want, u, 0, modules, offsets)
        torch.testing.assert_close(y_got, y_want, rtol=1e-4, atol=1e-4, msg=f"expand {modules}")
        assert not torch.equal(y_got, y0), f"{modules}: expand changed nothing"




def test_segments_are_runs_of_one_slot_skipping_base_tokens():
    assert segments([3, 3, -1, 3, 5, 5, -1, -1, 2]) == ([0, 3, 4, 8], [2, 1, 2, 1], [3, 3, 5, 2])
    assert segments([-1, -1]) == ([], [], [])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_groups_no_adapter_of_the_batch_targets_cost_no_lora_work(scheme):
    """Attention-only adapters (S1 / S2): gate/up and down run the base model only, with no LoRA
    collective (fused would otherwise widen down's all-reduce by R)."""
    from lorafleet.engine.tp.collectives import CommLog
    from lorafleet.engine.tp.linear import column_parallel, row_parallel

    spec, plan, runner, adapters, slots = _runner("mha", 1, 0, scheme, "torch", torch.float32)
    attn_only = [i for i, ranks in enumerate(ADAPTER_RANKS) if set(ranks) <= {"q_proj", "k_proj", "v_proj", "o_proj"}]
    token_slot = torch.tensor([slots[attn_only[0]]] * 3 + [-1], dtype=torch.int32, device=DEVICE)
    batch = runner.tables.batch_of(token_slot)
    paged = runner.tables.lora_step(runner.pool, batch, runner.shrink_ops, runner.expand_ops)
    assert batch.targets == frozenset(ADAPTER_RANKS[attn_only[0]])
    log = CommLog()
    comm = TpComm(1, 0, log=log)
    lw = runner.model.w.layers[0]
    h = torch.randn(4, spec.hidden_size, device=DEVICE)
    gu = column_parallel(h, lw.gate_up, None, 0, GATE_UP, (0, spec.intermediate_size), paged, comm)
    torch.testing.assert_close(gu, h @ lw.gate_up.T)
    x_down = torch.randn(4, spec.intermediate_size, device=DEVICE)
    torch.testing.assert_close(row_parallel(x_down, lw.down, 0, DOWN, plan, paged, comm), x_down @ lw.down.T)
    assert [(c.op, c.elements) for c in log.calls] == [("all_reduce", 4 * spec.hidden_size)]
    o = row_parallel(torch.randn(4, spec.q_width, device=DEVICE), lw.o, 0, O, plan, paged, comm)
    assert o.shape == (4, spec.hidden_size) and len(log.calls) > 1  # o_proj is targeted: its LoRA runs

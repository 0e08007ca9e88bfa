"""Sharding of weights and adapters (one process): shapes, coverage, replication, rejections."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafleet.bench.tp_comm_model import adapter_bytes_per_rank
from lorafleet.engine.memory.layout import AdapterLayout
from lorafleet.engine.tp.partition import (
    COLUMN_PARALLEL,
    TensorParallelError,
    check_world,
    local_rank,
    local_spec,
    make_plan,
    piece_width,
    rank_rows,
)
from lorafleet.engine.tp.shard_adapters import Scheme, ShardLayout, shard_lora
from lorafleet.engine.tp.shard_weights import shard_layer, shard_model
from lorafleet.engine.weights_loader import random_weights
from lorafleet.formats.model_spec import LORA_MODULES
from tests.tp.cases import ADAPTER_RANKS, make_adapter, make_case, make_spec


@pytest.mark.parametrize("change,field", [
    (dict(num_heads=6, num_kv_heads=6, head_dim=8, hidden_size=48), "num_attention_heads 6"),
    (dict(num_heads=12, num_kv_heads=3, head_dim=4, hidden_size=48), "num_key_value_heads 3"),
    (dict(intermediate_size=90), "intermediate_size 90"),
])
def test_world_that_does_not_divide_the_model_is_rejected(change, field):
    spec = dataclasses.replace(make_spec("mha"), **change)
    with pytest.raises(TensorParallelError, match=field):
        check_world(spec, 4)


def test_bad_world_or_rank_is_rejected():
    spec = make_spec("mha")
    with pytest.raises(TensorParallelError, match="must be >= 1"):
        make_plan(spec, 0, 0)
    with pytest.raises(TensorParallelError, match="rank 2 is outside"):
        make_plan(spec, 2, 2)


@pytest.mark.parametrize("name,world", [("mha", 2), ("mha", 4), ("gqa", 2), ("gqa", 4), ("gqa", 8)])
def test_layer_shards_cover_the_layer(name, world):
    spec, lw = make_spec(name), make_case(name).layer
    shards = [shard_layer(lw, spec, make_plan(spec, world, r)) for r in range(world)]
    q_w, kv_w, I = spec.q_width, spec.kv_width, spec.intermediate_size
    q_loc, kv_loc = q_w // world, max(kv_w // world, spec.head_dim)
    q, k, v = lw.qkv.split((q_w, kv_w, kv_w))
    parts = [s.qkv.split((q_loc, kv_loc, kv_loc)) for s in shards]
    assert torch.equal(torch.cat([p[0] for p in parts]), q)
    # KV heads: split when nkv >= W; each head on W/nkv consecutive ranks otherwise
    reps = max(1, world // spec.num_kv_heads)
    assert torch.equal(torch.cat([p[1] for p in parts[::reps]]), k)
    assert torch.equal(torch.cat([p[2] for p in parts[::reps]]), v)
    for r in range(world):
        assert torch.equal(parts[r][1], parts[r - r % reps][1])
    assert torch.equal(torch.cat([s.o for s in shards], dim=1), lw.o)
    assert torch.equal(torch.cat([s.down for s in shards], dim=1), lw.down)
    gate, up = lw.gate_up.split((I, I))
    assert torch.equal(torch.cat([s.gate_up[: I // world] for s in shards]), gate)
    assert torch.equal(torch.cat([s.gate_up[I // world :] for s in shards]), up)
    if lw.qkv_bias is not None:
        assert torch.equal(torch.cat([s.qkv_bias[:q_loc] for s in shards]), lw.qkv_bias[:q_w])
    # a rank's query heads read exactly the KV head it holds: h // (nh / nkv)
    for r, plan in enumerate(make_plan(spec, world, rr) for rr in range(world)):
        group = spec.num_heads // spec.num_kv_heads
        first_head = plan.q_cols.start // spec.head_dim
        assert plan.kv_cols.start // spec.head_dim == first_head // group


def test_local_spec_sizes_the_rank_pool():
    spec = make_spec("gqa")  # 8 heads, 2 KV heads
    assert (local_spec(spec, 2).num_heads, local_spec(spec, 2).num_kv_heads) == (4, 1)
    assert (local_spec(spec, 4).num_heads, local_spec(spec, 4).num_kv_heads) == (2, 1)
    assert local_spec(spec, 4).intermediate_size == spec.intermediate_size // 4


def test_world_of_one_is_the_model_itself():
    spec = make_spec("gqa", num_layers=2)
    w = random_weights(spec, torch.float32, torch.device("cpu"), seed=3)
    one = shard_model(w, spec, make_plan(spec, 1, 0))
    for a, b in zip(w.layers, one.layers):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("qkv", "o", "gate_up", "down"))


@pytest.mark.parametrize("r,world", [(1, 2), (1, 4), (3, 2), (3, 4), (8, 4), (5, 8)])
def test_strided_rank_split_covers_every_row_once(r, world):
    rows = sorted(i for rank in range(world) for i in range(r)[rank_rows(r, world, rank)])
    assert rows == list(range(r))
    assert all(local_rank(r, world, rank) <= piece_width(r, world) for rank in range(world))
    # the gathered [W, p] pieces read as [p, W] are rows 0..r-1 in order, then padding
    p = piece_width(r, world)
    pieces = torch.full((world, p), -1)
    for rank in range(world):
        mine = torch.arange(r)[rank_rows(r, world, rank)]
        pieces[rank, : len(mine)] = mine
    assert pieces.T.reshape(-1)[:r].tolist() == list(range(r))
    assert (pieces.T.reshape(-1)[r:] == -1).all()


@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("world", [2, 4])
def test_adapter_shares_match_their_page_layout(scheme, world):
    spec = make_spec("gqa")
    for i, ranks in enumerate(ADAPTER_RANKS):
        weights = make_adapter(spec, ranks, seed=i)
        for rank in range(world):
            plan = make_plan(spec, world, rank)
            share = shard_lora(weights, plan, scheme)
            layout = ShardLayout.build(spec, weights.config.ranks_by_module(), plan, scheme)
            for m, name in enumerate(LORA_MODULES):
                a, b = share.a.get((0, name)), share.b.get((0, name))
                assert layout.a_shape[m] == (tuple(a.shape) if a is not None else (0, 0))
                assert layout.b_shape[m] == (tuple(b.T.shape) if b is not None else (0, 0))
                if name in COLUMN_PARALLEL and a is not None and scheme == Scheme.SLORA:
                    assert a.shape[0] == local_rank(ranks[name], world, rank)  # r=1: ranks 1.. hold none


@pytest.mark.parametrize("world", [2, 4])
def test_slora_pages_split_the_adapter(world):
    """S-LoRA's shares add up to the single-GPU adapter (up to per-matrix alignment)."""
    spec = make_spec("mha")
    ranks = {m: 8 for m in LORA_MODULES}
    whole = AdapterLayout.build(spec, ranks).layer_elems
    shares = [ShardLayout.build(spec, ranks, make_plan(spec, world, r), Scheme.SLORA).layer_elems for r in range(world)]
    assert whole <= sum(shares) <= whole + 2 * len(LORA_MODULES) * 16 * world



@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("name,world", [("mha", 2), ("mha", 4), ("gqa", 4)])
def test_comm_model_memory_matches_the_page_layout(scheme, name, world):
    """adapter_bytes_per_rank (bench/tp_comm.py's memory column) agrees with rank 0's pages."""
    spec = make_spec(name)
    ranks = {m: 8 for m in LORA_MODULES}
    layout = ShardLayout.build(spec, ranks, make_plan(spec, world, 0), scheme)
    modeled = adapter_bytes_per_rank(spec, world, scheme, 8, elem_bytes=1)
    assert modeled <= layout.layer_elems <= modeled + 2 * len(LORA_MODULES) * 16

"""The grouped adapter form (what the TP driver packs and broadcasts) cut into one rank's share
(RankRunner.load_grouped: whole-group copies) writes exactly what the per-target reference
(RankRunner.load_adapter, from the full matrices) writes: the same pool pages, bit for bit, and the
same table rows, for every scheme, world and rank, including per-layer ranks, adapters on some
layers only, and ranks below the world size (slora leaves a rank no A rows)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.memory.layout import PoolGeometry
from lorafleet.engine.ops.torch_ref import TorchAttentionOps
from lorafleet.engine.tp.collectives import TpComm
from lorafleet.engine.tp.grouped_adapter import GroupedPacker, group_targets, grouped_numel, pack_grouped, targets_of
from lorafleet.engine.tp.partition import local_spec, make_plan
from lorafleet.engine.tp.rank_runner import RankRunner, adapter_pages
from lorafleet.engine.tp.shard_adapters import Scheme
from lorafleet.engine.tp.shard_weights import shard_model
from lorafleet.engine.weights_loader import random_weights
from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import LORA_MODULES
from lorafleet.formats.peft_config import PeftLoraConfig, TargetEntry
from tests.tp.cases import SCHEMES, make_spec

LAYERS = 3
# adapter -> {(layer, module): rank}, targets listed layer by layer (as PEFT's modules are)
ADAPTERS = {
    "uniform": {(layer, m): 4 for layer in range(LAYERS) for m in LORA_MODULES},
    "patterned": {(0, "q_proj"): 8, (0, "o_proj"): 3, (0, "down_proj"): 1,
                  (1, "q_proj"): 2, (1, "k_proj"): 5, (1, "down_proj"): 1,
                  (2, "q_proj"): 8, (2, "o_proj"): 3, (2, "up_proj"): 2, (2, "down_proj"): 1},
}


def _adapter(spec, ranks: dict[tuple[int, str], int], seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    targets, a, b = [], {}, {}
    for (layer, module), r in ranks.items():
        in_f, out_f = spec.module_shape(module)
        targets.append(TargetEntry(layer, module, r, scale=1.0 + 0.25 * r))
        a[(layer, module)] = torch.randn(r, in_f, generator=g)  # [r, in] float32, as validated adapters are
        b[(layer, module)] = torch.randn(out_f, r, generator=g)  # [out, r]
    return LoraWeights(PeftLoraConfig(8, 16.0, False, tuple(targets)), a, b)


def _runner(spec, world: int, rank: int, scheme: str, dtype: torch.dtype) -> RankRunner:
    plan = make_plan(spec, world, rank)
    weights = shard_model(random_weights(spec, dtype, torch.device("cpu"), seed=3), spec, plan)
    page_elems = PoolGeometry.for_model(local_spec(spec, world), 1, 16).page_elems
    pool = torch.full((spec.num_layers, 40, page_elems), 7.0, dtype=dtype)  # stale contents: must be overwritten
    return RankRunner(spec, plan, weights, TorchAttentionOps(), TpComm(world, rank), pool, Scheme(scheme))


CASES = [(n, w, r, s) for n in ("mha", "gqa") for w in (2, 4) for r in range(w) for s in SCHEMES]


@pytest.mark.parametrize("name,world,rank,scheme", CASES, ids=[f"{n}-W{w}r{r}-{s}" for n, w, r, s in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_grouped_load_writes_what_the_per_target_load_writes(name, world, rank, scheme, dtype):
    spec = make_spec(name, num_layers=LAYERS)
    ref, fast = _runner(spec, world, rank, scheme, dtype), _runner(spec, world, rank, scheme, dtype)
    page_elems = ref.pool.shape[2]
    first = 3
    for i, (label, ranks) in enumerate(ADAPTERS.items()):
        w = _adapter(spec, ranks, seed=11 + i)
        n = adapter_pages(spec, w.config.ranks_by_module(), world, Scheme(scheme), page_elems)
        pages = list(range(first + n - 1, first - 1, -1))  # out of order, as the driver hands them out
        first += n + 2
        slot = 5 - 2 * i
        ref.load_adapter(slot, pages, w.config.ranks_by_module(), list(w.config.targets), w.a, w.b)
        packed = pack_grouped(w, spec, dtype)
        assert packed.buf.dtype == dtype and packed.buf.numel() == grouped_numel(spec, packed.targets)
        fast.load_grouped(slot, pages, packed.ranks_by_module, packed.targets, packed.buf)
        assert torch.equal(fast.pool, ref.pool), f"{label}: pool pages differ"
        for tables in ("shrink_tables", "expand_tables"):
            for table in ("page_table", "ranks", "scales", "a_off", "b_off"):
                got, want = getattr(getattr(fast.tables, tables), table), getattr(getattr(ref.tables, tables), table)
                assert torch.equal(got, want), f"{label}: {tables}.{table}"
        assert fast.tables.max_rank == ref.tables.max_rank and fast.tables.modules == ref.tables.modules


def test_groups_follow_first_targets_and_the_packer_reuses_a_buffer():
    spec = make_spec("mha", num_layers=LAYERS)
    w = _adapter(spec, ADAPTERS["patterned"], seed=1)
    assert group_targets(targets_of(w)) == [("q_proj", 8, [0, 2]), ("o_proj", 3, [0, 2]), ("down_proj", 1, [0, 1, 2]),
                                      ("q_proj", 2, [1]), ("k_proj", 5, [1]), ("up_proj", 2, [2])]
    packer = GroupedPacker(spec, torch.bfloat16)
    out = torch.full(packer.shape(w), 3.0, dtype=torch.bfloat16)
    packed = packer.pack(w, out)
    assert packed.buf.data_ptr() == out.data_ptr()
    # the first group's first matrix opens the buffer: q_proj A of layer 0, [8, H] row-major
    assert torch.equal(packed.buf[: 8 * spec.hidden_size], w.a[(0, "q_proj")].reshape(-1).to(torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        packer.pack(w, torch.zeros(5, dtype=torch.bfloat16))

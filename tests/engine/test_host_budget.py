"""The host budget of packed adapters follows the work: every waiting request's adapter is packed
once, however many distinct adapters wait, within a share of the host memory (cgroup-aware); a
fixed budget too small for the work repacks (the thrash this replaces)."""

from __future__ import annotations

import pytest

from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams
from lorafleet.engine.memory.host_budget import AdapterDemand, PackBudget, available_host_bytes
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.zoo import ADAPTERS


def test_the_budget_is_twice_the_demand_within_floor_and_ceiling():
    b = PackBudget(floor=100, ceiling=1000)
    assert [b.for_demand(d) for d in (0, 40, 50, 300, 499, 500, 10_000)] == [100, 100, 100, 600, 998, 1000, 1000]
    assert b.next_budget(200, 300, step=False) == 600  # up at once
    assert b.next_budget(600, 0, step=False) == 600  # an arrival never lowers it
    assert b.next_budget(600, 0, step=True) == int(600 * (1 - 1 / 1024))  # a step lowers it a little
    assert b.next_budget(101, 0, step=True) == 100
    assert PackBudget.from_host(available=8 << 30) == PackBudget(floor=512 << 20, ceiling=2 << 30)
    assert PackBudget.from_host(available=1 << 30).floor == 256 << 20  # never above the ceiling


def test_demand_counts_distinct_adapters_once_until_their_last_request_leaves():
    d = AdapterDemand()
    d.add("a", 10), d.add("a", 10), d.add("b", 7)
    assert (d.bytes, d.distinct) == (17, 2)
    d.remove("a")
    assert (d.bytes, d.distinct) == (17, 2)
    d.remove("a"), d.remove("b")
    assert (d.bytes, d.distinct) == (0, 0)


def test_a_cgroup_limit_caps_the_available_memory(tmp_path):
    (tmp_path / "memory.max").write_text(f"{1 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{256 << 20}\n")
    assert available_host_bytes(tmp_path) <= 768 << 20
    (tmp_path / "memory.max").write_text("max\n")
    assert available_host_bytes(tmp_path) == available_host_bytes(tmp_path / "absent") > 768 << 20


def _run_trace(zoo, packed_adapter_bytes: int) -> tuple[LLMEngine, list[tuple[int, int]]]:
    """Four waves of 10 requests, each wave over 10 distinct adapter ids (20 in all: the zoo's
    adapters under many names), on a pool that holds few adapters at a time, so adapters are
    evicted from the pool and loaded again, from their packs while the host still holds them.
    Sized to the work (packed_adapter_bytes 0), the floor is one pack: the zoo's packs are tiny,
    and the host's real floor would hold them all whatever the demand.
    -> (engine, [(packs made, distinct adapters, packs made at load time) per wave])."""
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=24, max_num_seqs=4,
                                 packed_adapter_bytes=packed_adapter_bytes))
    weights = [load_peft_adapter_dir(zoo.adapter("mha", name), eng.spec) for name in ADAPTERS]
    one = max(eng.adapters.pack_bytes(w) for w in weights)
    if packed_adapter_bytes == 0:
        eng.adapters.pack_budget = PackBudget(floor=one, ceiling=1000 * one)
    eng.adapters.host.resize(one)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    waves = []
    for wave in range(4):
        packs, on_demand, ids = eng.adapters.host.num_packs, eng.adapters.host.num_packed_on_demand, set()
        for i in range(10):
            k = (i + 5 * wave) % 20
            ids.add(k)
            eng.add_request(f"w{wave}-{i}", prompt_token_ids=[4 + i, 5, 6 + wave], params=params,
                            adapter_id=f"ad{k}", adapter=weights[k % len(weights)])
        eng.run_to_completion()
        waves.append((eng.adapters.host.num_packs - packs, len(ids), eng.adapters.host.num_packed_on_demand - on_demand))
    return eng, waves


def test_sized_to_the_work_no_waiting_requests_adapter_is_packed_twice(zoo):
    eng, waves = _run_trace(zoo, packed_adapter_bytes=0)
    assert eng.adapters.num_evictions > 0  # the pool really dropped adapters that came back
    # every pack made ahead, at arrival (none on the step's critical path), and none twice
    assert all(packs <= distinct and on_demand == 0 for packs, distinct, on_demand in waves), waves
    assert sum(w[0] for w in waves[1:]) < sum(w[1] for w in waves[1:])  # and packs of earlier waves reused
    # with no request left, the budget falls back to its floor, slowly, one step at a time
    assert eng.scheduler.adapter_demand.bytes == 0
    assert eng.adapters.host.budget_bytes > eng.adapters.pack_budget.floor
    packs = eng.adapters.host.num_packs
    for _ in range(20_000):
        eng.step()
    assert eng.adapters.host.budget_bytes == eng.adapters.pack_budget.floor
    assert eng.adapters.host.num_packs == packs  # lowering the budget repacked nothing


def test_a_fixed_budget_too_small_for_the_work_packs_at_load_time(zoo):
    """The lookahead packs only what half the budget holds; the rest is packed when its request is
    admitted, on the engine thread, while the step waits (what a 2 GiB budget did to S2)."""
    _, waves = _run_trace(zoo, packed_adapter_bytes=1)  # one pack at a time
    assert all(on_demand > 0 for _, _, on_demand in waves), waves


@pytest.mark.parametrize("ceiling_packs", [3])
def test_the_ceiling_bounds_the_budget_whatever_the_demand(zoo, ceiling_packs):
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=24, max_num_seqs=2))
    w = load_peft_adapter_dir(zoo.adapter("mha", "r8-all-rslora"), eng.spec)
    one = eng.adapters.pack_bytes(w)
    eng.adapters.pack_budget = PackBudget(floor=one, ceiling=ceiling_packs * one)
    for i in range(8):
        eng.add_request(f"c{i}", prompt_token_ids=[5, 6, 7], adapter_id=f"c{i}", adapter=w,
                        params=SamplingParams(max_tokens=1, temperature=0))
    assert eng.scheduler.adapter_demand.bytes == 8 * one
    eng.step()
    assert eng.adapters.host.budget_bytes == ceiling_packs * one
    assert eng.adapters.host.used_bytes <= ceiling_packs * one
    eng.run_to_completion()

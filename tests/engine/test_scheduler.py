"""Scheduler unit tests on the CPU with fake model outputs (no model runs)."""

from __future__ import annotations

import random

import pytest

from .fakes import check_accounting, fake_step, make_request, make_scheduler, make_weights


def test_token_budget_and_chunked_prefill():
    s = make_scheduler(num_pages=200, max_batched_tokens=10)
    for i in range(3):
        s.add_request(make_request(f"r{i}", prompt_len=25, max_tokens=3))
    seen_chunks = []
    while s.has_unfinished():
        out = fake_step(s)
        assert 0 < out.num_tokens <= 10
        seen_chunks.append([(e.request.request_id, e.num_tokens) for e in out.scheduled])
        check_accounting(s)
    assert seen_chunks[0] == [("r0", 10)]  # a 25-token prompt is split into chunks of the budget
    assert seen_chunks[1] == [("r0", 10)] and seen_chunks[2][0] == ("r0", 5)


def test_decodes_before_new_prefills():
    s = make_scheduler(num_pages=200, max_batched_tokens=8)
    s.add_request(make_request("a", prompt_len=4, max_tokens=5))
    fake_step(s)  # a's prompt
    s.add_request(make_request("b", prompt_len=30, max_tokens=1))
    out = s.schedule()
    assert [(e.request.request_id, e.num_tokens) for e in out.scheduled] == [("a", 1), ("b", 7)]


def test_admission_counts_adapter_pages():
    w = make_weights(rank=2, modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    s = make_scheduler(num_pages=12)
    adapter_pages = s.adapters.pages_to_load(w)
    assert adapter_pages > 1
    # A request needing all remaining pages but the adapter's waits for the base request to finish.
    s.add_request(make_request("base", prompt_len=4 * (12 - adapter_pages) - 2, max_tokens=2))
    s.add_request(make_request("lora", prompt_len=4, max_tokens=1, adapter=("ad", w)))
    out = fake_step(s)
    assert [e.request.request_id for e in out.scheduled] == ["base"]
    while s.has_unfinished():
        fake_step(s)
        check_accounting(s)
    assert s.adapters.is_resident("ad") and s.adapters.pins("ad") == 0  # cached after use


def test_preemption_by_recompute_then_everyone_finishes():
    s = make_scheduler(num_pages=10, max_batched_tokens=64)
    for i in range(4):
        s.add_request(make_request(f"r{i}", prompt_len=6, max_tokens=14))
    finished_order, preempted = [], set()
    while s.has_unfinished():
        out = fake_step(s)
        preempted.update(out.preempted)
        check_accounting(s)
        finished_order += [r for r in ("r0", "r1", "r2", "r3") if r not in s.requests and r not in finished_order]
    assert preempted, "a pool of 10 pages for 4 x 20 tokens must preempt"
    assert "r0" not in preempted  # the oldest request is never the victim while newer ones run
    assert finished_order[0] == "r0"


def test_cached_adapters_evicted_lru_and_pinned_never():
    s = make_scheduler(num_pages=16, slots=8)
    ws = {f"ad{i}": make_weights(rank=4, seed=i) for i in range(3)}
    for i, (aid, w) in enumerate(ws.items()):
        s.add_request(make_request(f"q{i}", prompt_len=3, max_tokens=1, adapter=(aid, w)))
        while s.has_unfinished():
            fake_step(s)
    assert s.adapters.cached_ids() == ["ad0", "ad1", "ad2"]
    pinned = make_weights(rank=4, seed=9)
    s.add_request(make_request("p", prompt_len=3, max_tokens=40, adapter=("pinned", pinned)))
    fake_step(s)
    # A base request that needs most of the pool forces evictions: least recently used first.
    s.add_request(make_request("big", prompt_len=4 * 9, max_tokens=1))
    while "big" in s.requests:
        fake_step(s)
        check_accounting(s)
        assert s.adapters.is_resident("pinned")
    assert not s.adapters.is_resident("ad0")
    assert s.adapters.num_evictions >= 1


def test_head_of_line_request_is_not_starved():
    s = make_scheduler(num_pages=12, max_batched_tokens=64)
    s.add_request(make_request("small0", prompt_len=4, max_tokens=20))
    fake_step(s)
    s.add_request(make_request("big", prompt_len=36, max_tokens=4))  # needs 10 of 12 pages
    for i in range(1, 6):
        s.add_request(make_request(f"small{i}", prompt_len=2, max_tokens=2))
    admitted = []
    while s.has_unfinished():
        out = fake_step(s)
        admitted += [e.request.request_id for e in out.scheduled if e.request.request_id not in admitted]
    assert admitted.index("big") < admitted.index("small1")  # later small requests do not overtake


def test_request_larger_than_pool_is_rejected():
    s = make_scheduler(num_pages=4)
    with pytest.raises(ValueError, match="needs 5 pages"):
        s.add_request(make_request("huge", prompt_len=16, max_tokens=4))


def test_abort_frees_everything():
    w = make_weights(rank=2)
    s = make_scheduler(num_pages=20)
    s.add_request(make_request("x", prompt_len=10, max_tokens=10, adapter=("ad", w)))
    s.add_request(make_request("y", prompt_len=10, max_tokens=10))
    fake_step(s)
    assert s.finish_request("x", "abort").finish_reason == "abort"
    assert s.finish_request("y", "abort") is not None
    assert s.finish_request("y", "abort") is None
    check_accounting(s)
    assert s.kv.used_pages() == 0 and s.adapters.pins("ad") == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_complete_with_exact_lengths(seed):
    rng = random.Random(seed)
    ws = {f"ad{i}": make_weights(rank=rng.choice([1, 3, 4]), seed=i) for i in range(5)}
    s = make_scheduler(num_pages=rng.randint(14, 30), max_batched_tokens=rng.choice([8, 16, 64]),
                       max_num_seqs=rng.choice([2, 4, 16]), slots=rng.choice([2, 4, 8]))
    want = {}
    for i in range(20):
        aid = rng.choice([None, *ws])
        req = make_request(f"r{i}", rng.randint(1, 20), rng.randint(1, 12), (aid, ws[aid]) if aid else None)
        s.add_request(req)
        want[req.request_id] = req
    for _ in range(2000):
        if not s.has_unfinished():
            break
        out = fake_step(s)
        assert out.num_tokens <= s.config.max_batched_tokens and len(s.running) <= s.config.max_num_seqs
        check_accounting(s)
    assert not s.has_unfinished(), "the workload must finish (no deadlock)"
    for rid, req in want.items():
        assert len(req.output_token_ids) == req.params.max_tokens and req.finish_reason == "length"


@pytest.mark.parametrize("k", [1, 3])
def test_split_phases_steps_are_pure_and_everyone_finishes(k):
    from lorafleet.engine.scheduler import SchedulerConfig

    s = make_scheduler(num_pages=40, max_batched_tokens=16)
    s.config = SchedulerConfig(max_num_seqs=16, max_batched_tokens=16, decode_steps_per_prefill=k)
    rng = random.Random(k)
    reqs = [make_request(f"r{i}", rng.randint(2, 30), rng.randint(1, 8)) for i in range(12)]
    pending, saw_decode_step = list(reqs), False
    for _ in range(1000):
        if not (pending or s.has_unfinished()):
            break
        if pending and rng.random() < 0.5:
            s.add_request(pending.pop(0))
        partial = any(r.num_tokens - r.num_computed_tokens > 1 for r in s.running)
        admissible, waited = s._admissible_tokens(), s._decode_steps  # before this step
        out = s.schedule()
        remaining = [e.request.num_tokens - e.request.num_computed_tokens for e in out.scheduled]
        if out.scheduled and all(r == 1 for r in remaining):
            saw_decode_step = True
            # A prefill step is due after k decode steps when a prompt is half done or enough
            # prompt tokens can be admitted, and after 4k steps whenever any can.
            assert not (waited >= k and (partial or admissible >= 16 // 4)), "prefill work waited past k"
            assert not (waited >= 4 * k and admissible > 0), "admissible prefill work waited past 4k"
        else:
            # a prefill step never carries a running request's decode token
            assert all(r > 1 or e.request.num_computed_tokens == 0 for r, e in zip(remaining, out.scheduled))
        s.update_from_output(out, {e.request.request_id: 7 for e in out.scheduled if e.samples}, eos_ids=(2,))
        check_accounting(s)
    assert not s.has_unfinished() and not pending
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert saw_decode_step


def test_split_phases_wait_for_a_worthwhile_prefill_under_memory_pressure():
    """With the pool full of running decodes, a prompt that cannot be admitted yet does not cause
    prefill steps; once memory frees, the prefill step comes after k decode steps."""
    from lorafleet.engine.scheduler import SchedulerConfig

    s = make_scheduler(num_pages=12, max_batched_tokens=64)
    s.config = SchedulerConfig(max_num_seqs=16, max_batched_tokens=64, decode_steps_per_prefill=2)
    s.add_request(make_request("long", prompt_len=4 * 8, max_tokens=12))  # 8 pages now, 11 at the end
    fake_step(s)  # its prefill
    s.add_request(make_request("next", prompt_len=4 * 3, max_tokens=2))  # needs 3-4 pages: not free yet
    phases = []
    while s.has_unfinished():
        out = fake_step(s)
        if not out.scheduled:
            phases.append("empty")
        else:
            phases.append("prefill" if any(e.request.request_id == "next" and e.num_tokens > 1 for e in out.scheduled) else "decode")
    assert "empty" not in phases  # no prefill step was spent on a queue that could not be admitted
    assert phases.count("prefill") == 1
    assert phases.index("prefill") >= 2


def test_prefetch_uses_only_free_pages_and_admission_finds_the_adapter_resident():
    w, other = make_weights(rank=2, seed=1), make_weights(rank=2, seed=2)
    s = make_scheduler(num_pages=12, slots=4)
    assert s.adapters.prefetch("ad", w) and s.adapters.cached_ids() == ["ad"] and s.adapters.pins("ad") == 0
    check_accounting(s)
    loads = s.adapters.num_loads
    s.add_request(make_request("r", prompt_len=3, max_tokens=2, adapter=("ad", w)))
    while s.has_unfinished():
        fake_step(s)
    assert s.adapters.num_loads == loads  # admitted onto the prefetched copy
    # KV takes every free page: a prefetch that would need an eviction is declined.
    s.add_request(make_request("big", prompt_len=4 * (12 - s.adapters.pages_to_load(w)) - 1, max_tokens=2))
    fake_step(s)
    assert s.kv.allocator.num_free == 0
    assert not s.adapters.prefetch("other", other) and s.adapters.is_resident("ad")
    check_accounting(s)

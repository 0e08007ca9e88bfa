"""Scheduler unit tests on the CPU with fake model outputs (no model runs)."""

from __future__ import annotations

import random

import pytest

from lorafleet.engine.request import SamplingParams

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
        before = {r.request_id: r.num_tokens - r.num_computed_tokens for r in [*s.running, *s.waiting]}
        out = s.schedule()
        remaining = [before[e.request.request_id] for e in out.scheduled]
        if out.scheduled and all(r == 1 for r in remaining):
            saw_decode_step = True
            # A prefill step is due after k decode steps when a prompt is half done or enough
            # prompt tokens can be admitted, and after 4k steps whenever any can.
            assert not (waited >= k and (partial or admissible >= 16 // 4)), "prefill work waited past k"
            assert not (waited >= 4 * k and admissible > 0), "admissible prefill work waited past 4k"
        else:
            # a prefill step never carries a running request's decode token
            assert all(r > 1 or e.start == 0 for r, e in zip(remaining, out.scheduled))
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


# --- asynchronous scheduling: a step scheduled before the previous one's tokens are known ------


def _lagged_loop(s, eos_at: dict[str, int] | None = None, steps: int = 500):
    """schedule(t+1) before update(t), as the engine's asynchronous steps do; the fake model
    samples 7, or EOS (2) at a request's output index eos_at[rid]. -> finished requests' outputs."""
    eos_at, prev, outputs = eos_at or {}, None, {}
    for _ in range(steps):
        out = s.schedule()
        check_accounting(s)
        for e in out.scheduled:
            r = e.request
            assert r.num_pending <= 2 and e.start + e.num_tokens <= r.num_tokens
            # a step reads at most one token whose value is not known yet: the previous step's
            assert e.start + e.num_tokens - (len(r.prompt_token_ids) + len(r.output_token_ids)) <= 1
        if prev is not None:
            sampled = {e.request.request_id: 2 if eos_at.get(e.request.request_id) == e.request.num_output_tokens - e.request.num_pending else 7
                       for e in prev.scheduled if e.samples}
            for r in s.update_from_output(prev, sampled, eos_ids=(2,)):
                if r.finished:
                    outputs[r.request_id] = (list(r.output_token_ids), r.finish_reason)
        prev = None if out.empty else out
        if prev is None and not s.has_unfinished():
            break
    return outputs


def test_a_pending_last_token_is_not_scheduled_again():
    s = make_scheduler(num_pages=50)
    s.add_request(make_request("a", prompt_len=5, max_tokens=2))
    first = s.schedule()  # prompt: token 1 pending
    second = s.schedule()  # decode of token 2 before token 1 is known
    assert [(e.start, e.num_tokens, e.samples) for e in second.scheduled] == [(5, 1, True)]
    assert s.requests["a"].num_pending == 2
    assert s.schedule().empty  # token 2 is the last: nothing more to compute
    s.update_from_output(first, {"a": 7}, eos_ids=(2,))
    s.update_from_output(second, {"a": 8}, eos_ids=(2,))
    assert "a" not in s.requests and s.kv.used_pages() == 0


def test_eos_while_the_next_step_runs_drops_that_steps_token_and_frees_everything():
    w = make_weights(rank=2)
    s = make_scheduler(num_pages=60)
    s.add_request(make_request("a", prompt_len=5, max_tokens=9, adapter=("ad", w)))
    s.requests["a"].params = SamplingParams(max_tokens=9, temperature=0)  # EOS counts
    first = s.schedule()
    second = s.schedule()  # decode launched before the prompt's token is known
    touched = s.update_from_output(first, {"a": 2}, eos_ids=(2,))  # it was EOS
    assert touched[0].finish_reason == "stop" and touched[0].output_token_ids == [2]
    assert s.kv.used_pages() == 0 and s.adapters.pins("ad") == 0
    assert s.update_from_output(second, {"a": 9}, eos_ids=(2,)) == []  # dropped
    assert touched[0].output_token_ids == [2]


def test_a_request_preempted_with_a_pending_token_waits_for_it_then_recomputes():
    s = make_scheduler(num_pages=6, max_batched_tokens=64)  # 6 pages of 4 tokens
    s.add_request(make_request("old", prompt_len=8, max_tokens=12))
    s.add_request(make_request("new", prompt_len=7, max_tokens=12))
    first = s.schedule()  # both prompts: 2 + 2 pages, one token pending each
    assert [e.request.request_id for e in first.scheduled] == ["old", "new"]
    while True:  # decode until the pool runs short and "new" (the newest) is preempted
        out = s.schedule()
        if out.preempted:
            break
        s.update_from_output(first, {e.request.request_id: 7 for e in first.scheduled if e.samples}, (2,))
        first = out
    new = s.requests["new"]
    assert out.preempted == ["new"] and new.num_pending == 1 and new.num_computed_tokens == 0
    s.update_from_output(first, {e.request.request_id: 7 for e in first.scheduled if e.samples}, (2,))
    assert new.num_pending == 0 and new in s.waiting  # its token is known: it can be recomputed
    check_accounting(s)


def test_a_waiting_request_with_a_pending_token_is_not_admitted_until_it_is_known():
    s = make_scheduler(num_pages=50)
    s.add_request(make_request("a", prompt_len=6, max_tokens=5))
    first = s.schedule()
    s._preempt(s.requests["a"])  # as a preemption in the next schedule() would
    assert s.schedule().empty  # plenty of pages, but its last token is not known
    s.update_from_output(first, {"a": 7}, eos_ids=(2,))
    again = s.schedule()
    assert [(e.start, e.num_tokens, e.samples) for e in again.scheduled] == [(0, 7, True)]


@pytest.mark.parametrize("seed", range(6))
def test_lagged_steps_finish_everyone_with_the_tokens_of_one_step_at_a_time(seed):
    """A random mix (chunked prompts, preemption, EOS at random indices, max_tokens 1): the lagged
    loop ends every request with the outputs the one-step-at-a-time loop gives."""
    rng = random.Random(seed)
    specs = [(f"r{i}", rng.randint(1, 30), rng.randint(1, 10)) for i in range(10)]
    eos_at = {rid: rng.randint(0, mt) for rid, _, mt in specs if rng.random() < 0.4}

    def fresh():
        s = make_scheduler(num_pages=16, max_batched_tokens=rng.choice([8, 16, 64]), max_num_seqs=6)
        for rid, n, mt in specs:
            r = make_request(rid, prompt_len=n, max_tokens=mt)
            r.params = SamplingParams(max_tokens=mt, temperature=0)
            s.add_request(r)
        return s

    s = fresh()
    want = {}
    while s.has_unfinished():
        out = s.schedule()
        sampled = {e.request.request_id: 2 if eos_at.get(e.request.request_id) == len(e.request.output_token_ids) else 7
                   for e in out.scheduled if e.samples}
        for r in s.update_from_output(out, sampled, eos_ids=(2,)):
            if r.finished:
                want[r.request_id] = (list(r.output_token_ids), r.finish_reason)
    got = _lagged_loop(fresh(), eos_at)
    assert got == want and len(got) == len(specs)

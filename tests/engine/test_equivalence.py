"""Greedy tokens of the engine equal HF transformers + PEFT, for every request of one mixed batch."""

from __future__ import annotations

import pytest

from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.mixed_requests import EQUALITY_PROMPT_LENGTHS, add_mixed_requests, prompt_ids
from tests.zoo import ADAPTERS

PROMPT_LENGTHS = EQUALITY_PROMPT_LENGTHS
MAX_TOKENS = 10


def _run_mixed(zoo, model: str, **cfg):
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model(model)), **cfg))
    expected_jobs = add_mixed_requests(eng, zoo, model, PROMPT_LENGTHS, MAX_TOKENS)
    return eng, eng.run_to_completion(), expected_jobs


def _check(zoo, reference, model, results, jobs):
    for rid, name, prompt in jobs:
        adapter_dir = None if name is None else zoo.adapter(model, name)
        want = reference.greedy(zoo.model(model), adapter_dir, prompt, MAX_TOKENS)
        got = generated_ids(results[rid])
        assert got == want, f"{model} request {rid}: engine {got} != HF PEFT {want}"
        assert results[rid][-1].finished and results[rid][-1].finish_reason == "length"


@pytest.mark.parametrize("model", ["mha", "gqa"])
def test_mixed_batch_matches_hf_peft(zoo, reference, model):
    eng, results, jobs = _run_mixed(zoo, model, num_pages=256)
    _check(zoo, reference, model, results, jobs)
    assert eng.adapters.num_evictions == 0


@pytest.mark.parametrize("model,num_pages,split", [("mha", 10, 0), ("gqa", 20, 0), ("gqa", 20, 2)])
def test_small_pool_preempts_and_evicts_yet_matches(zoo, reference, model, num_pages, split):
    # A pool barely larger than the biggest single request plus the biggest adapter, and a small
    # token budget (chunked prefill): requests are preempted and adapters evicted along the way.
    # split > 0: decode-only and prefill-only steps alternate (the CUDA-graph schedule).
    eng, results, jobs = _run_mixed(zoo, model, num_pages=num_pages, max_batched_tokens=24,
                                    decode_steps_per_prefill=split)
    _check(zoo, reference, model, results, jobs)
    assert eng.adapters.num_evictions > 0
    assert eng.scheduler_stats["preemptions"] > 0
    assert eng.kv.num_requests == 0 and eng.adapters.resident_pages() == eng.kv.allocator.num_used


@pytest.mark.parametrize("model", ["qwen2", "mistral"])
def test_other_architectures_match_hf(zoo, reference, model):
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model(model)), num_pages=64))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    prompts = {f"p{n}": prompt_ids(n, n) for n in PROMPT_LENGTHS}
    for rid, prompt in prompts.items():
        eng.add_request(rid, prompt_token_ids=prompt, params=params)
    results = eng.run_to_completion()
    for rid, prompt in prompts.items():
        assert generated_ids(results[rid]) == reference.greedy(zoo.model(model), None, prompt, MAX_TOKENS)


def test_batch_invariance(zoo):
    """A request's tokens do not depend on what else is in the batch (greedy and seeded)."""
    model = "gqa"
    eng_alone = LLMEngine(EngineConfig(model_dir=str(zoo.model(model)), num_pages=128))
    w = load_peft_adapter_dir(zoo.adapter(model, "r8-all-rslora"), eng_alone.spec)
    probes = {
        "greedy": SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        "seeded": SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True),
    }
    prompt = prompt_ids(21, 5)
    alone = {}
    for kind, p in probes.items():
        eng_alone.add_request(kind, prompt_token_ids=prompt, params=p, adapter_id="a", adapter=w)
        alone[kind] = generated_ids(eng_alone.run_to_completion()[kind])

    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model(model)), num_pages=128, max_batched_tokens=40))
    others = {name: load_peft_adapter_dir(zoo.adapter(model, name), eng.spec) for name in ADAPTERS}
    for i, (name, weights) in enumerate(others.items()):
        eng.add_request(f"noise{i}", prompt_token_ids=prompt_ids(5 + 7 * i, i), adapter_id=name, adapter=weights,
                        params=SamplingParams(max_tokens=8 + i, temperature=1.0, seed=i))
    for kind, p in probes.items():
        eng.add_request(kind, prompt_token_ids=prompt, params=p, adapter_id="a", adapter=w)
    eng.add_request("base-noise", prompt_token_ids=prompt_ids(30, 9), params=SamplingParams(max_tokens=5))
    results = eng.run_to_completion()
    for kind in probes:
        assert generated_ids(results[kind]) == alone[kind], kind

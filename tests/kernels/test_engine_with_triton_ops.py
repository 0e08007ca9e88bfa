"""The engine with the Triton ops (interpreter on the CPU) gives HF PEFT's greedy tokens for a
mixed batch: the kernels are wired to the engine exactly as the torch reference is."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids
from lorafleet.formats.lora_weights import load_peft_adapter_dir

if torch.cuda.is_available():
    pytest.skip("on a GPU, tests/engine/test_gpu_engine.py covers the Triton ops in bf16", allow_module_level=True)

MAX_TOKENS = 4


@pytest.mark.parametrize("model", ["mha", "gqa"])
def test_mixed_batch_with_triton_ops_matches_hf_peft(zoo, reference, model):
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model(model)), num_pages=64, ops="triton", max_batched_tokens=32))
    assert type(eng.lora_ops).__name__ == "TritonLoraOps"
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    jobs = {}
    for i, name in enumerate((None, "r1-attn", "r8-all-rslora", "r4-pattern")):
        prompt = [(19 * i + 5 * j) % 500 + 4 for j in range(3 + 9 * i)]  # up to 30 tokens: chunked prefill
        w = None if name is None else load_peft_adapter_dir(zoo.adapter(model, name), eng.spec)
        eng.add_request(f"r{i}", prompt_token_ids=prompt, params=params, adapter_id=name, adapter=w)
        jobs[f"r{i}"] = (name, prompt)
    results = eng.run_to_completion()
    for rid, (name, prompt) in jobs.items():
        want = reference.greedy(zoo.model(model), name and zoo.adapter(model, name), prompt, MAX_TOKENS)
        assert generated_ids(results[rid]) == want, rid

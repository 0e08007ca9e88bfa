"""On a GPU: the engine with the fused elementwise kernels (kernels/fused_ops.py) generates the
same greedy tokens as with the torch elementwise sequence, LoRA and attention kernels alike, with
and without decode CUDA graphs. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids  # noqa: E402
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.engine.test_gpu_engine import MARGIN, _hf_teacher_forced  # noqa: E402
from tests.zoo import ADAPTERS  # noqa: E402

MAX_TOKENS = 12


def _generate(zoo, model: str, elementwise: str, graphs: bool, dtype: str) -> dict[str, tuple[str | None, list[int], list[int]]]:
    """rid -> (adapter, prompt, greedy tokens): a mixed batch (chunked prefills, then decodes)."""
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model(model)), device="cuda", dtype=dtype, num_pages=256, ops="triton",
                                 elementwise_ops=elementwise, cuda_graphs=graphs, max_num_seqs=8, max_batched_tokens=32))  # fmt: skip
    want = "TritonElementwiseOps" if elementwise == "triton" else "TorchElementwiseOps"
    assert type(eng.model.ew).__name__ == want
    assert (eng.decode_graphs is not None) == graphs
    if graphs:
        assert type(eng.decode_graphs.model.ew).__name__ == "TritonElementwiseOps"
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    names = (None, *ADAPTERS) if model in ("mha", "gqa") else (None,) * 4  # the zoo has adapters for these two
    jobs = {}
    for i, name in enumerate(names):
        prompt = [(13 * i + 7 * j) % 500 + 4 for j in range(4 + 7 * i)]
        w = None if name is None else load_peft_adapter_dir(zoo.adapter(model, name), eng.spec)
        eng.add_request(f"r{i}", prompt_token_ids=prompt, params=params, adapter_id=name, adapter=w)
        jobs[f"r{i}"] = (name, prompt)
    results = eng.run_to_completion()
    eng.close()
    return {rid: (name, prompt, generated_ids(results[rid])) for rid, (name, prompt) in jobs.items()}


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("model", ["mha", "gqa", "qwen2"])
def test_fp32_fused_tokens_equal_torch_elementwise(zoo, model, graphs):
    # fp32: the two differ by a few fp32 ulps at most, far below any top-2 logit gap.
    fused = _generate(zoo, model, "triton", graphs, "float32")
    reference = _generate(zoo, model, "torch", False, "float32")
    assert fused == reference


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("model", ["mha", "gqa"])
def test_bf16_fused_tokens_equal_torch_elementwise_until_a_near_tie(zoo, model, graphs):
    """bf16: near-bitwise kernels may flip a token only where the logits nearly tie; there the
    sequences may part (HF's top-2 margin at that position must be below MARGIN)."""
    fused = _generate(zoo, model, "triton", graphs, "bfloat16")
    reference = _generate(zoo, model, "torch", False, "bfloat16")
    identical = 0
    for rid, (name, prompt, got) in fused.items():
        want = reference[rid][2]
        if got == want:
            identical += 1
            continue
        t = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        _, margins = _hf_teacher_forced(zoo.model(model), name and zoo.adapter(model, name), prompt, got[: t + 1])
        assert margins[t] < MARGIN, f"{rid} ({name}) token {t}: fused {got[t]} != torch {want[t]} (HF margin {margins[t]:.3f})"
    assert identical >= len(fused) // 2, f"only {identical} of {len(fused)} sequences identical"

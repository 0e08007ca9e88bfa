"""On a GPU (bf16, Triton kernels): greedy output equals HF PEFT wherever the reference's top-2
logit margin is clear of bf16 rounding. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.zoo import ADAPTERS

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

MAX_TOKENS = 12
MARGIN = 0.1  # logits closer than this at the top may flip under bf16 rounding


@torch.inference_mode()
def _hf_teacher_forced(model_dir, adapter_dir, prompt, generated):
    """HF PEFT (bf16) logits over prompt + the engine's own output: argmax and top-2 margin of
    each generated position, so one small-margin position does not end the comparison."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt + generated], device="cuda")
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [n, V]: predicts each generated token
    top = logits.topk(2, dim=-1).values
    return logits.argmax(-1).tolist(), (top[:, 0] - top[:, 1]).tolist()


@pytest.mark.parametrize("model", ["mha", "gqa"])
@pytest.mark.parametrize("ops,graphs", [("triton", True), ("triton", False), ("torch", False)])
def test_bf16_greedy_matches_hf_peft_where_margins_are_clear(zoo, model, ops, graphs):
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model(model)), device="cuda", dtype="bfloat16", num_pages=256, ops=ops,
                                 cuda_graphs=graphs, max_num_seqs=8))
    assert (eng.decode_graphs is not None) == graphs
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    jobs = {}
    for i, name in enumerate((None, *ADAPTERS)):
        prompt = [(17 * i + 3 * j) % 500 + 4 for j in range(5 + 6 * i)]
        w = None if name is None else load_peft_adapter_dir(zoo.adapter(model, name), eng.spec)
        eng.add_request(f"r{i}", prompt_token_ids=prompt, params=params, adapter_id=name, adapter=w)
        jobs[f"r{i}"] = (name, prompt)
    results = eng.run_to_completion()
    compared = total = 0
    for rid, (name, prompt) in jobs.items():
        got = generated_ids(results[rid])
        want, margins = _hf_teacher_forced(zoo.model(model), name and zoo.adapter(model, name), prompt, got)
        for t, (g, w, m) in enumerate(zip(got, want, margins)):
            total += 1
            if m >= MARGIN:
                assert g == w, f"{model}/{ops} {rid} ({name}) token {t}: engine {g} != HF {w} (margin {m:.3f})"
                compared += 1
    assert compared >= total // 4, f"too few clear-margin tokens compared ({compared} of {total})"


# (requests' adapters, the LoRA variant their decode graph steps must replay: cuda_graphs.LORA_VARIANTS)
VARIANT_CASES = {"base only": ((None,), 0), "attention": (("r1-attn", "r16-qv-layer1"), 1), "mlp": (("r2-mlp", None), 2)}


@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_graph_lora_variants_match_hf_peft(zoo, case):
    """Decode graph steps replay the smallest LoRA variant covering the batch's targets, and their
    tokens still equal HF PEFT's where the margins are clear."""
    names, variant = VARIANT_CASES[case]
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), device="cuda", dtype="bfloat16", num_pages=256,
                                 max_num_seqs=8))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    jobs = {}
    for i, name in enumerate(names):
        prompt = [(13 * i + 7 * j) % 500 + 4 for j in range(6 + 5 * i)]
        w = None if name is None else load_peft_adapter_dir(zoo.adapter("mha", name), eng.spec)
        eng.add_request(f"r{i}", prompt_token_ids=prompt, params=params, adapter_id=name, adapter=w)
        jobs[f"r{i}"] = (name, prompt)
    results = eng.run_to_completion()
    replays = eng.decode_graphs.variant_replays
    assert replays[variant] > 0 and sum(replays[variant + 1 :]) == 0, f"{case}: replays per variant {replays}"
    for rid, (name, prompt) in jobs.items():
        got = generated_ids(results[rid])
        want, margins = _hf_teacher_forced(zoo.model("mha"), name and zoo.adapter("mha", name), prompt, got)
        for t, (g, w, m) in enumerate(zip(got, want, margins)):
            if m >= MARGIN:
                assert g == w, f"{case} {rid} ({name}) token {t}: engine {g} != HF {w} (margin {m:.3f})"

"""A step launches LoRA kernels only for the module groups its adapters target (build_batch's
LoraBatch.targets), and a decode graph step replays the smallest LoRA variant covering them."""

from __future__ import annotations

import pytest

from lorafleet.engine.cuda_graphs import LORA_VARIANTS, graph_key, graph_keys, lora_variant
from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids
from lorafleet.engine.ops.base import LoraBatch
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from lorafleet.formats.model_spec import LORA_MODULES

ATTN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def test_variant_is_the_smallest_covering_the_targets():
    assert lora_variant(frozenset()) == 0 and LORA_VARIANTS[0] == frozenset()
    assert LORA_VARIANTS[lora_variant(frozenset({"q_proj", "v_proj"}))] == ATTN  # PEFT's default targets
    assert LORA_VARIANTS[lora_variant(ATTN)] == ATTN
    assert LORA_VARIANTS[lora_variant(frozenset({"down_proj"}))] == frozenset(LORA_MODULES)
    assert LORA_VARIANTS[lora_variant(frozenset({"o_proj", "up_proj"}))] == frozenset(LORA_MODULES)
    assert lora_variant(None) == len(LORA_VARIANTS) - 1  # unknown targets: every module
    assert graph_keys([1, 2]) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def test_graph_key_is_the_smallest_bucket_and_variant_that_fit():
    def batch(targets):
        return LoraBatch(None, None, None, None, max_rank=8, max_seg_len=1, num_segments=1, targets=targets)

    buckets = [1, 2, 4, 8]
    assert graph_key(buckets, 3, None) == (4, 0)
    assert graph_key(buckets, 4, batch(frozenset({"q_proj", "v_proj"}))) == (4, 1)
    assert graph_key(buckets, 5, batch(frozenset({"down_proj"}))) == (8, 2)
    assert graph_key(buckets, 1, batch(None)) == (1, 2)


class CountingOps:
    """The engine's LoRA ops, recording the module groups each shrink ran for."""

    def __init__(self, ops):
        self.ops, self.groups = ops, set()

    def shrink(self, x, layer, modules, ctx):
        self.groups.add(frozenset(LORA_MODULES[m] for m in modules))
        return self.ops.shrink(x, layer, modules, ctx)

    def expand(self, *args):
        return self.ops.expand(*args)


# (adapters of the batch, the module groups that must run LoRA kernels)
CASES = {
    "attention only": (("r1-attn", "r16-qv-layer1"), {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "mlp only": (("r2-mlp",), {"gate_proj", "up_proj", "down_proj"}),
    "q/v only": (("r16-qv-layer1",), {"q_proj", "k_proj", "v_proj"}),
    "base only": ((None,), set()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_untargeted_groups_launch_nothing_and_tokens_match_hf_not_the_base_model(zoo, reference, case):
    names, want_modules = CASES[case]
    eng = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=128))
    counting = eng.lora_ops = CountingOps(eng.lora_ops)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    jobs = []
    for i, name in enumerate(names):
        prompt = [(11 * i + 5 * j) % 300 + 4 for j in range(6 + 3 * i)]
        w = None if name is None else load_peft_adapter_dir(zoo.adapter("mha", name), eng.spec)
        eng.add_request(f"r{i}", prompt_token_ids=prompt, params=params, adapter_id=name, adapter=w)
        jobs.append((f"r{i}", name, prompt))
    results = eng.run_to_completion()
    ran = set().union(*counting.groups) if counting.groups else set()
    assert ran == want_modules, f"{case}: LoRA kernels ran for {sorted(ran)}"
    for rid, name, prompt in jobs:
        adapter_dir = None if name is None else zoo.adapter("mha", name)
        want = reference.greedy(zoo.model("mha"), adapter_dir, prompt, 4)
        assert generated_ids(results[rid]) == want, rid
        # and the adapter matters on this prompt: an engine running without LoRA would not match
        base = reference.greedy(zoo.model("mha"), None, prompt, 4)
        assert name is None or want != base, f"{rid}: {name} is a no-op here"

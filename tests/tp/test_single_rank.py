"""The tensor-parallel decoder with a world of one (no process group) equals HF + PEFT."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.model import QKV
from lorafleet.engine.tp.collectives import TpComm, single_rank
from lorafleet.engine.tp.linear import column_parallel
from lorafleet.engine.tp.partition import make_plan
from lorafleet.engine.tp.shard_adapters import Scheme, shard_lora
from lorafleet.formats.model_spec import ModelSpec
from tests.tp.cases import make_case
from tests.tp.lora_math import TpLoraBatch
from tests.tp.reference import DECODER_JOB, reference_logits
from tests.tp.workers import run_decoder_job
from tests.zoo import ADAPTERS


@pytest.mark.parametrize("model", ["mha", "qwen2", "mistral"])
def test_world_of_one_matches_hf(zoo, model):
    """mha with five adapters; qwen2 (q/k/v biases, tied embeddings) and mistral (1 KV head) base-only."""
    has_adapters = model == "mha"
    adapters = [str(zoo.adapter(model, name)) for name in ADAPTERS] if has_adapters else []
    job = dict(DECODER_JOB, adapters=adapters)
    if not has_adapters:
        job["seq_adapter"] = [-1] * len(job["prompts"])
    want_prefill, want_decode = reference_logits(zoo.model(model), adapters, job) if has_adapters else _base(zoo, model, job)
    spec = ModelSpec.from_pretrained(zoo.model(model))
    results = run_decoder_job(spec, str(zoo.model(model)), job, make_plan(spec, 1, 0), single_rank())
    for scheme, got in results.items():
        torch.testing.assert_close(got["prefill"], want_prefill, atol=1e-4, rtol=1e-4, msg=lambda m: f"{scheme}: {m}")
        torch.testing.assert_close(got["decode"], want_decode, atol=1e-4, rtol=1e-4, msg=lambda m: f"{scheme}: {m}")


@torch.inference_mode()
def _base(zoo, model, job):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(zoo.model(model), dtype=torch.float32).eval()
    rows = [hf(torch.tensor([p + [n]])).logits[0] for p, n in zip(job["prompts"], job["next"])]
    return torch.cat([r[:-1] for r in rows]), torch.stack([r[-1] for r in rows])


def test_a_batch_mixing_schemes_is_refused():
    case = make_case("mha")
    plan = make_plan(case.spec, 1, 0)
    shares = [shard_lora(case.adapters[0], plan, Scheme.SLORA), shard_lora(case.adapters[3], plan, Scheme.FUSED)]
    lora = TpLoraBatch(torch.tensor([0, 1]), shares)
    with pytest.raises(ValueError, match="mixes adapters sharded for different schemes"):
        # (a world of two: at one the scheme is never read; the refusal comes before any collective)
        column_parallel(case.x[:2], case.layer.qkv, None, 0, QKV, (0, 64, 128), lora, TpComm(2, 0))


def test_token_adapter_out_of_range_is_refused():
    case = make_case("mha")
    lora = TpLoraBatch(torch.tensor([0, 2]), [shard_lora(case.adapters[0], make_plan(case.spec, 1, 0), "slora")])
    with pytest.raises(ValueError, match="token_adapter holds 2, but only 1 adapters"):
        lora.groups()

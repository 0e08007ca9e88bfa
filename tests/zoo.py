"""Shared test fixtures: tiny models and PEFT adapters built locally (deterministic), and the HF + PEFT greedy reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lorafleet.demo.tiny_models import build_peft_adapter, build_tiny_model

# name -> build_tiny_model arguments
MODELS = {
    "mha": dict(arch="llama", hidden_size=64, num_heads=4, num_kv_heads=4, seed=1),
    "gqa": dict(
        arch="llama", hidden_size=128, intermediate_size=192, num_heads=8, num_kv_heads=2, seed=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen2": dict(arch="qwen2", hidden_size=64, num_heads=4, num_kv_heads=2, tie_embeddings=True, seed=3),
    "mistral": dict(arch="mistral", hidden_size=64, num_heads=4, num_kv_heads=1, seed=4),
    # 6 heads over 3 KV heads: tensor parallelism over 3 ranks (a world that is not a power of two)
    "gqa6": dict(arch="llama", hidden_size=96, intermediate_size=192, num_heads=6, num_kv_heads=3, seed=5),
}
ADAPTER_MODELS = ("mha", "gqa", "gqa6")  # the models the zoo builds every adapter of ADAPTERS for

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# name -> build_peft_adapter arguments: ranks 1, 2, 8, 16 (+ rank patterns, with and without rsLoRA),
# different module subsets. init_std is set per adapter so that each one changes the base model's
# greedy tokens early for most prompts (tests/test_zoo_adapters_matter.py): the lower the rank and
# the fewer the modules, the larger the weights.
ADAPTERS = {
    "r1-attn": dict(r=1, lora_alpha=2, target_modules=ATTN, seed=11, init_std=0.15),
    "r2-mlp": dict(r=2, lora_alpha=4, target_modules=MLP, seed=12, init_std=0.1),
    # rsLoRA scales each module by its own alpha / sqrt(its own rank): o_proj 16 / sqrt(2),
    # up_proj 8 / sqrt(4), down_proj 4 / sqrt(8), the rest 8 / sqrt(8)
    "r8-all-rslora": dict(r=8, lora_alpha=8, target_modules=ATTN + MLP, use_rslora=True,
                          rank_pattern={"o_proj": 2, "up_proj": 4}, alpha_pattern={"o_proj": 16, "down_proj": 4},
                          seed=13),
    "r16-qv-layer1": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], seed=14,
                          init_std=0.15),
    "r4-pattern": dict(r=4, lora_alpha=8, target_modules=ATTN + MLP, rank_pattern={"down_proj": 2},
                       alpha_pattern={"q_proj": 32}, seed=15),
}


@dataclass
class Zoo:
    root: Path

    def model(self, name: str) -> Path:
        return self.root / name

    def adapter(self, model: str, name: str) -> Path:
        return self.root / f"{model}-adapters" / name


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("zoo")
    for name, kwargs in MODELS.items():
        build_tiny_model(root / name, **kwargs)
    for model in ADAPTER_MODELS:
        for name, kwargs in ADAPTERS.items():
            build_peft_adapter(root / model, root / f"{model}-adapters" / name, **kwargs)
    return Zoo(root)


class Reference:
    """Greedy decoding with HF transformers (+ PEFT): a plain loop over the KV-cached forward.

    (generate() is avoided on purpose: it masks prompt tokens equal to pad_token_id.)
    """

    def __init__(self):
        self._models = {}

    def _model(self, model_dir: Path, adapter_dir: Path | None):
        key = (model_dir, adapter_dir)
        if key not in self._models:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            if adapter_dir is not None:
                from peft import PeftModel

                m = PeftModel.from_pretrained(m, adapter_dir)
            self._models[key] = m.eval()
        return self._models[key]

    @torch.inference_mode()
    def greedy(self, model_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
        model = self._model(model_dir, adapter_dir)
        out = model(torch.tensor([prompt]), use_cache=True)
        past, ids = out.past_key_values, []
        for _ in range(n):
            nxt = int(out.logits[0, -1].argmax())
            ids.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
        return ids


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()

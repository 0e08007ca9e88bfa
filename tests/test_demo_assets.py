"""The deterministic tiny models, tokenizer, PEFT adapters and demo assets (services/demo)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.demo.tiny_models import build_peft_adapter, build_tiny_model
from services.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer
from services.engine.model_spec import ModelSpec


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _greedy(model, tok, prompt: str, n: int = 12) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD_ID)
    return out[0, ids.shape[1]:].tolist()


def test_tokenizer_round_trips_utf8_and_is_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tok) == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    text = "Café au lait, naïve 🙂🚀 — 日本語 and the baker."
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID
    assert tok.decode(ids, skip_special_tokens=True) == text
    # trained merges: common corpus words take fewer tokens than their bytes
    assert len(tok("The baker opened the shop").input_ids) < 12


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(arch="llama"),
        dict(arch="llama", num_heads=8, num_kv_heads=2, tie_embeddings=True),
        dict(
            arch="llama",
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        dict(arch="mistral", num_kv_heads=2),
        dict(arch="qwen2", num_kv_heads=2, head_dim=32),
    ],
    ids=["llama", "llama-gqa-tied", "llama3-rope", "mistral-gqa", "qwen2-headdim"],
)
def test_tiny_model_is_deterministic_loads_and_decodes_variously(tmp_path, kwargs):
    first = build_tiny_model(tmp_path / "m1", **kwargs)
    second = build_tiny_model(tmp_path / "m2", **kwargs)
    assert _digest(first) == _digest(second)
    other_seed = build_tiny_model(tmp_path / "m3", **kwargs, seed=1)
    assert _digest(other_seed)["model.safetensors"] != _digest(first)["model.safetensors"]

    spec = ModelSpec.from_pretrained(first)
    assert spec.model_type == kwargs["arch"]
    assert spec.num_kv_heads == kwargs.get("num_kv_heads", 4)
    assert spec.eos_token_ids == (EOS_ID,) and spec.bos_token_id == BOS_ID
    assert spec.tie_word_embeddings == kwargs.get("tie_embeddings", False)
    if "rope_scaling" in kwargs:
        assert spec.rope.scaling_type == "llama3" and spec.rope.original_max_position == 64

    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(first)
    assert len(tok) <= model.config.vocab_size
    if kwargs["arch"] == "qwen2":  # random biases, so an engine that drops them is caught
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    outputs = {tuple(_greedy(model, tok, p)) for p in ("The baker", "Hello world", "A program is", "x")}
    assert len(outputs) == 4, "greedy continuations of a random model should differ across prompts"
    # random models may fall into a loop on some prompt, but not on most
    lively = [out for out in outputs if len(set(out)) > 3]
    assert len(lively) >= 3, f"degenerate greedy outputs {outputs}"


def test_peft_adapter_is_deterministic_and_changes_outputs(tmp_path):
    from peft import PeftModel

    base = build_tiny_model(tmp_path / "base", num_heads=8, num_kv_heads=2)
    kwargs = dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_rslora=True,
        layers_to_transform=[0, 1],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"down_proj": 4},
        seed=3,
    )
    a1 = build_peft_adapter(base, tmp_path / "a1", **kwargs)
    a2 = build_peft_adapter(base, tmp_path / "a2", **kwargs)
    assert _digest(a1)["adapter_model.safetensors"] == _digest(a2)["adapter_model.safetensors"]
    assert _digest(a1)["adapter_config.json"] == _digest(a2)["adapter_config.json"]
    config = json.loads((a1 / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["use_rslora"] is True and config["rank_pattern"] == {"down_proj": 4}

    tok = AutoTokenizer.from_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), a1).eval()
    down = wrapped.base_model.model.model.layers[0].mlp.down_proj
    assert down.lora_A["default"].weight.shape[0] == 4  # rank_pattern honoured
    assert down.lora_B["default"].weight.abs().sum() > 0  # B non-zero: the adapter is not a no-op
    prompts = ("The baker", "Hello world", "A program is", "The sea is large")
    changed = sum(_greedy(plain, tok, p) != _greedy(wrapped, tok, p) for p in prompts)
    assert changed >= 3

"""Deterministic tiny random models of the Llama family and PEFT LoRA adapters for them.

Same arguments -> byte-identical files: every parameter is drawn from one torch.Generator seeded
with `seed`, in sorted parameter-name order, independent of transformers' own init scheme.

Weights are scaled so that a random model is not degenerate: every block contributes O(1) to the
residual stream (std = 1/sqrt(fan_in)), attention scores have unit variance so context matters,
and logits have std ~2 so greedy decoding has clear top-1 margins and differs across prompts.
Norm weights and Qwen2's q/k/v biases are random too (not 1 / 0), so an engine that drops them
produces different outputs and its tests notice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lorafleet.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, tokenizer_vocab_size

ARCHS = ("llama", "mistral", "qwen2")
EMBED_STD_TIED = 0.2  # times 1/sqrt(hidden)


def _config(arch: str, **kw: Any):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **kw)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, sliding_window=None, **kw)
    raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")


def build_tiny_model(
    out_dir: Path,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    head_dim: int | None = None,
    vocab_size: int = 512,
    tie_embeddings: bool = False,
    rope_scaling: dict | None = None,
    max_position: int = 512,
    seed: int = 0,
    rope_theta: float = 10000.0,
) -> Path:
    """Build a random float32 `<arch>ForCausalLM` plus the demo tokenizer in `out_dir`.

    The tokenizer is trained for `vocab_size` entries; if the corpus offers fewer merges its
    vocabulary is smaller and the model's extra embedding rows are simply never produced by
    encoding (like padded vocabularies of real models). bos/eos/pad ids match the tokenizer.
    `rope_scaling`: e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}.
    """
    from transformers import AutoModelForCausalLM

    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    head_dim = head_dim or hidden_size // num_heads
    rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling:
        rope_parameters = {**dict(rope_scaling), "rope_theta": float(rope_theta)}
    config = _config(
        arch,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_embeddings,
        rope_parameters=rope_parameters,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
    )
    real_vocab = tokenizer_vocab_size(vocab_size)
    if real_vocab > vocab_size:
        raise RuntimeError(f"tokenizer has {real_vocab} tokens, more than vocab_size {vocab_size}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_parameters(model, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    build_tokenizer(out_dir, vocab_size)
    return out_dir


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one generator, in sorted name order (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    # Tied: the embedding is also the output head. Kept small in the residual stream (at std 1 each
    # token's own embedding would dominate its logits and greedy decoding would repeat it), with
    # the final norm's weight scaled up so the logits still have std ~2.
    tied = bool(model.config.tie_word_embeddings)
    embed_std = EMBED_STD_TIED / math.sqrt(hidden) if tied else 1.0
    final_norm_gain = 2.0 / EMBED_STD_TIED if tied else 1.0
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name == "model.norm.weight":
            value = final_norm_gain * (1.0 + 0.1 * noise)
        elif name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = noise * embed_std
        elif name.startswith("lm_head"):
            value = noise * (2.0 / math.sqrt(hidden))  # logits: [V], std ~2
        else:  # linear weight [out, in]
            value = noise / math.sqrt(param.shape[1])
        param.copy_(value.to(param.dtype))


def build_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int,
    lora_alpha: float,
    target_modules: list[str],
    use_rslora: bool = False,
    layers_to_transform: list[int] | None = None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    seed: int = 0,
    init_std: float = 0.05,
) -> Path:
    """A PEFT LoRA adapter for the model in `base_dir` with random, non-zero A and B.

    PEFT initialises B to zero (a no-op adapter); here every lora_A and lora_B weight is drawn from
    a generator seeded with `seed` (sorted name order) so the adapter changes outputs noticeably.
    Both are N(0, init_std^2); with the tiny models' unit-scale activations the default changes
    each targeted module's output by roughly 5-20 %, enough to change greedy continuations.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        layers_to_transform=list(layers_to_transform) if layers_to_transform is not None else None,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    randomize_lora_weights(model, seed, init_std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    normalize_adapter_config(out_dir)
    return out_dir


def normalize_adapter_config(adapter_dir: Path, base_model_name: str | None = None) -> None:
    """Make adapter_config.json byte-stable: PEFT keeps target_modules as a set, whose order
    changes with PYTHONHASHSEED from one process to the next; optionally replace the base path."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    if base_model_name is not None:
        config["base_model_name_or_path"] = base_model_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def randomize_lora_weights(model: torch.nn.Module, seed: int, init_std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if ".lora_A." in name or ".lora_B." in name:
            # lora_A: [r, in]; lora_B: [out, r]; both N(0, init_std^2)
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_((noise * init_std).to(param.dtype))

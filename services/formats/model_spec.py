"""The shape of a Llama-family base model, read from a Hugging Face config.

One frozen dataclass that every other part of the engine (weights, pool, adapters, kernels) reads
sizes from, so that Llama 2/3, Mistral and Qwen2 differ only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# The seven linear modules of a Llama block that LoRA may target, in the engine's fixed order.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_INDEX = {name: i for i, name in enumerate(LORA_MODULES)}


class UnsupportedModelError(ValueError):
    """The model folder describes a model this engine cannot run."""


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    # llama3 scaling (None: plain RoPE). Linear scaling is covered by `factor` with type "linear".
    scaling_type: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: q/k/v carry biases
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one of the seven linear modules."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelSpec":
        """Build from a transformers PretrainedConfig (or anything with the same attributes)."""
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = cfg.num_attention_heads
        num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        if num_heads % num_kv:
            raise UnsupportedModelError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg.hidden_act!r} is not supported (only silu)")
        if model_type == "mistral" and getattr(cfg, "sliding_window", None) not in (None, 0):
            if cfg.sliding_window < cfg.max_position_embeddings:
                raise UnsupportedModelError(
                    f"sliding_window {cfg.sliding_window} < max_position_embeddings: sliding-window attention is not supported"
                )
        if model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
            raise UnsupportedModelError("use_sliding_window=true is not supported")
        rope = _rope_spec(cfg)
        eos = getattr(cfg, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        bias = bool(getattr(cfg, "attention_bias", False)) or model_type == "qwen2"
        if getattr(cfg, "mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        return cls(
            model_type=model_type,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            max_position=cfg.max_position_embeddings,
            rms_norm_eps=cfg.rms_norm_eps,
            rope=rope,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=bias,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(cfg, "bos_token_id", None),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelSpec":
        from transformers import AutoConfig

        return cls.from_hf_config(AutoConfig.from_pretrained(str(model_dir)))


def _rope_spec(cfg: Any) -> RopeSpec:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta + rope_scaling.
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type in (None, "default"):
        return RopeSpec(theta=theta)
    if rope_type == "llama3":
        return RopeSpec(
            theta=theta,
            scaling_type="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
        )
    if rope_type == "linear":
        return RopeSpec(theta=theta, scaling_type="linear", factor=float(merged["factor"]))
    raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")

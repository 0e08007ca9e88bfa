"""Load a Llama-family checkpoint (safetensors only) into the engine's fused layout.

Per layer: qkv [q + 2 kv, H] (and its bias for Qwen2), o [H, q], gate_up [2 I, H], down [H, I].
Fusing q/k/v and gate/up makes each one matmul; LoRA adds into the matching output columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .model_spec import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [q + 2 kv, H]
    qkv_bias: torch.Tensor | None  # [q + 2 kv]
    o: torch.Tensor  # [H, q]
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)


class CheckpointError(ValueError):
    """The model folder's weights are missing, pickled, or do not match config.json."""


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f"; found {pickles}, but pickle checkpoints are never loaded" if pickles else ""
        raise CheckpointError(f"no *.safetensors weights in {model_dir}{hint}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def load_weights(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    raw = _read_all(Path(model_dir))

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = raw.pop(name, None)
        if t is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        return t.to(device=device, dtype=dtype)

    H, I, q, kv, V = spec.hidden_size, spec.intermediate_size, spec.q_width, spec.kv_width, spec.vocab_size
    embed = take("model.embed_tokens.weight", (V, H))
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([take(p + "self_attn.q_proj.weight", (q, H)), take(p + "self_attn.k_proj.weight", (kv, H)),
                         take(p + "self_attn.v_proj.weight", (kv, H))])
        bias = None
        if spec.attention_bias:
            bias = torch.cat([take(p + "self_attn.q_proj.bias", (q,)), take(p + "self_attn.k_proj.bias", (kv,)),
                              take(p + "self_attn.v_proj.bias", (kv,))])
        gate_up = torch.cat([take(p + "mlp.gate_proj.weight", (I, H)), take(p + "mlp.up_proj.weight", (I, H))])
        layers.append(LayerWeights(
            input_norm=take(p + "input_layernorm.weight", (H,)),
            qkv=qkv,
            qkv_bias=bias,
            o=take(p + "self_attn.o_proj.weight", (H, q)),
            post_norm=take(p + "post_attention_layernorm.weight", (H,)),
            gate_up=gate_up,
            down=take(p + "mlp.down_proj.weight", (H, I)),
        ))
    final_norm = take("model.norm.weight", (H,))
    if spec.tie_word_embeddings:
        raw.pop("lm_head.weight", None)
        lm_head = embed
    else:
        lm_head = take("lm_head.weight", (V, H))
    leftovers = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise CheckpointError(f"unexpected tensors in the checkpoint, e.g. {leftovers[:3]}")
    return ModelWeights(embed, layers, final_norm, lm_head)


def random_weights(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int) -> ModelWeights:
    """Random weights made on the device (benchmarks of model shapes no checkpoint is at hand for).

    Scaled like a trained model's (std 1/sqrt(fan_in), norms at 1) so activations stay finite.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, q, kv, V = spec.hidden_size, spec.intermediate_size, spec.q_width, spec.kv_width, spec.vocab_size

    def mat(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32) / cols ** 0.5).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    embed = mat(V, H)
    layers = [
        LayerWeights(
            input_norm=ones(H), qkv=mat(q + 2 * kv, H),
            qkv_bias=torch.zeros(q + 2 * kv, device=device, dtype=dtype) if spec.attention_bias else None,
            o=mat(H, q), post_norm=ones(H), gate_up=mat(2 * I, H), down=mat(H, I),
        )
        for _ in range(spec.num_layers)
    ]
    lm_head = embed if spec.tie_word_embeddings else mat(V, H)
    return ModelWeights(embed, layers, ones(H), lm_head)

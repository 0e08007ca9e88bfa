"""Load a Llama-family checkpoint (safetensors only) into the engine's fused layout.

Per layer: qkv [q + 2 kv, H] (and its bias for Qwen2), o [H, q], gate_up [2 I, H], down [H, I].
Fusing q/k/v and gate/up makes each one matmul; LoRA adds into the matching output columns.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorafleet.common.progress import progress
from lorafleet.formats.model_spec import ModelSpec


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


@dataclass(frozen=True)
class WeightSlices:
    """The part of each split matrix one process reads (a tensor-parallel rank: tp/partition's
    slices; one process: everything). Only these bytes are read from the files."""

    q: slice | None = None  # rows of q_proj (and its bias), input columns of o_proj; None: all
    kv: slice | None = None  # rows of k_proj and v_proj (and their biases)
    inter: slice | None = None  # rows of gate_proj and up_proj, input columns of down_proj


WHOLE = WeightSlices()


class _Checkpoint:
    """The model folder's safetensors files, read lazily: a tensor (or a slice of it) is read
    from the memory-mapped file when it is taken, so a rank never holds the whole model."""

    def __init__(self, model_dir: Path, stack: ExitStack):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in model_dir.glob("*.bin"))
            hint = f"; found {pickles}, but pickle checkpoints are never loaded" if pickles else ""
            raise CheckpointError(f"no *.safetensors weights in {model_dir}{hint}")
        self.unread: dict[str, object] = {}  # tensor name -> the open file holding it
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            self.unread.update((name, handle) for name in handle.keys())

    def take(self, name: str, shape: tuple[int, ...], rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor `name` (checked to have the full `shape`), or only its [rows] / [:, cols]."""
        handle = self.unread.pop(name, None)
        if handle is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        part = handle.get_slice(name)
        if tuple(part.get_shape()) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(part.get_shape())}, config.json implies {shape}")
        if rows is not None:
            return _owned(part[rows])
        if cols is not None:
            return _owned(part[:, cols])  # (safetensors reads whole rows and returns a strided view)
        return handle.get_tensor(name)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t` in storage of its own size: a slice must not keep the whole matrix alive."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def load_weights(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 slices: WeightSlices = WHOLE) -> ModelWeights:
    """The checkpoint in the fused layout; `slices`: only a tensor-parallel rank's part of q/k/v,
    o, gate/up and down (tp/shard_weights.py makes the same shard from whole weights)."""
    with ExitStack() as stack:
        ckpt = _Checkpoint(Path(model_dir), stack)
        weights = _assemble(ckpt, spec, slices, lambda t: t.to(device=device, dtype=dtype))
        leftovers = [k for k in ckpt.unread if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise CheckpointError(f"unexpected tensors in the checkpoint, e.g. {leftovers[:3]}")
    return weights


def _assemble(ckpt: _Checkpoint, spec: ModelSpec, sl: WeightSlices, put) -> ModelWeights:
    H, I, q, kv, V = spec.hidden_size, spec.intermediate_size, spec.q_width, spec.kv_width, spec.vocab_size

    def take(name: str, shape: tuple[int, ...], **part) -> torch.Tensor:
        return put(ckpt.take(name, shape, **part))

    embed = take("model.embed_tokens.weight", (V, H))
    layers = []
    for i in progress(range(spec.num_layers), "loading weights", unit="layer"):
        p = f"model.layers.{i}."
        qkv = torch.cat([take(p + "self_attn.q_proj.weight", (q, H), rows=sl.q),
                         take(p + "self_attn.k_proj.weight", (kv, H), rows=sl.kv),
                         take(p + "self_attn.v_proj.weight", (kv, H), rows=sl.kv)])
        bias = None
        if spec.attention_bias:
            bias = torch.cat([take(p + "self_attn.q_proj.bias", (q,), rows=sl.q),
                              take(p + "self_attn.k_proj.bias", (kv,), rows=sl.kv),
                              take(p + "self_attn.v_proj.bias", (kv,), rows=sl.kv)])
        gate_up = torch.cat([take(p + "mlp.gate_proj.weight", (I, H), rows=sl.inter),
                             take(p + "mlp.up_proj.weight", (I, H), rows=sl.inter)])
        layers.append(LayerWeights(
            input_norm=take(p + "input_layernorm.weight", (H,)),
            qkv=qkv,
            qkv_bias=bias,
            o=take(p + "self_attn.o_proj.weight", (H, q), cols=sl.q),
            post_norm=take(p + "post_attention_layernorm.weight", (H,)),
            gate_up=gate_up,
            down=take(p + "mlp.down_proj.weight", (H, I), cols=sl.inter),
        ))
    final_norm = take("model.norm.weight", (H,))
    if spec.tie_word_embeddings:
        ckpt.unread.pop("lm_head.weight", None)
        lm_head = embed
    else:
        lm_head = take("lm_head.weight", (V, H))
    return ModelWeights(embed, layers, final_norm, lm_head)


def random_weights(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int,
                   per_layer: Callable[[LayerWeights], LayerWeights] | None = None) -> ModelWeights:
    """Random weights made on the device (benchmarks of model shapes no checkpoint is at hand for).

    Scaled like a trained model's (std 1/sqrt(fan_in), norms at 1) so activations stay finite.
    per_layer: applied to each layer as soon as it is made (a TP rank keeps only its shard, so
    one full layer at a time is on the device, never the whole model); the values do not change.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, q, kv, V = spec.hidden_size, spec.intermediate_size, spec.q_width, spec.kv_width, spec.vocab_size

    def mat(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32) / cols ** 0.5).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    embed = mat(V, H)
    keep = per_layer or (lambda layer: layer)
    layers = [
        keep(LayerWeights(
            input_norm=ones(H), qkv=mat(q + 2 * kv, H),
            qkv_bias=torch.zeros(q + 2 * kv, device=device, dtype=dtype) if spec.attention_bias else None,
            o=mat(H, q), post_norm=ones(H), gate_up=mat(2 * I, H), down=mat(H, I),
        ))
        for _ in range(spec.num_layers)
    ]
    lm_head = embed if spec.tie_word_embeddings else mat(V, H)
    return ModelWeights(embed, layers, ones(H), lm_head)

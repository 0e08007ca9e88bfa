"""Rotary position embeddings as Llama computes them (rotate-half form), incl. llama3 scaling."""

from __future__ import annotations

import math

import torch

from lorafleet.formats.model_spec import RopeSpec


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """inv_freq: [head_dim // 2] float32, after the model's rope scaling."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.scaling_type == "linear":
        return inv / rope.factor
    if rope.scaling_type != "llama3":
        return inv
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    old_len = rope.original_max_position
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding:
    """Holds cos/sin for every position up to max_position, on the model's device."""

    def __init__(self, rope: RopeSpec, head_dim: int, max_position: int, dtype: torch.dtype, device: torch.device):
        inv = inverse_frequencies(rope, head_dim).to(device)
        pos = torch.arange(max_position, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv)  # [P, D/2] float32
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D]; positions: [T] -> rotated x (same dtype)."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def apply_qk_(self, qkv: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
        """Rotate q and k in place inside qkv [T, (nh + 2 nkv) * D] (the columns q, then k, then v)."""
        d = self.cos.shape[1]
        q = qkv[:, : num_heads * d].view(-1, num_heads, d)  # views: copy_ writes into qkv
        k = qkv[:, num_heads * d : (num_heads + num_kv_heads) * d].view(-1, num_kv_heads, d)
        q.copy_(self.apply(q, positions))
        k.copy_(self.apply(k, positions))

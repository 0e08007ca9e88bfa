"""Batched sampling with per-request parameters and per-request deterministic randomness.

Randomness is a counter-based hash of (seed, output index, token id), not a generator shared by
the batch: a request with a seed gets the same tokens whatever else runs beside it, on any device,
and after a preemption (which recomputes but does not re-draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply rounds) on int64 tensors holding values < 2^32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) for each [row, j]: a pure function of (seeds[row], steps[row], token_ids[row, j])."""
    s = seeds.unsqueeze(1)
    h = _hash32(token_ids ^ _hash32(steps.unsqueeze(1) ^ 0x9E3779B9))
    h = _hash32(h ^ (s & _M32))
    h = _hash32(h ^ ((s >> 32) & _M32))
    return ((h >> 8).double() + 0.5) / float(1 << 24)


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [N] float32
    top_p: torch.Tensor  # [N] float32
    top_k: torch.Tensor  # [N] int64 (0: off)
    seeds: torch.Tensor  # [N] int64 (non-negative)
    steps: torch.Tensor  # [N] int64: index of the token being drawn among the request's outputs
    all_greedy: bool


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits: [N, V] float32 -> next token ids [N] int64."""
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    temp = batch.temperature.clamp(min=1e-5).unsqueeze(1)
    sorted_logits, sorted_ids = (logits / temp).sort(dim=-1, descending=True)  # [N, V]
    vocab_rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    top_k = batch.top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill((top_k > 0) & (vocab_rank >= top_k), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before >= batch.top_p.unsqueeze(1), 0.0)
    # Exponential race: argmax p / E with E = -log u is a draw from p (ties have measure zero).
    u = uniform_noise(batch.seeds, batch.steps, sorted_ids)
    choice = (probs.double() / -torch.log(u)).argmax(dim=-1, keepdim=True)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    return torch.where(batch.temperature == 0, greedy_tokens, sampled)

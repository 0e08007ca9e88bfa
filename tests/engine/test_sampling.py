"""Sampling: greedy, temperature, top-k, top-p, per-request seeds independent of the batch."""

from __future__ import annotations

import torch

from lorafleet.engine.sampling import SamplingBatch, sample


def _batch(n, temperature=1.0, top_p=1.0, top_k=0, seeds=None, steps=None):
    return SamplingBatch(
        temperature=torch.full((n,), temperature), top_p=torch.full((n,), top_p),
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        seeds=torch.tensor(seeds if seeds is not None else list(range(n)), dtype=torch.int64),
        steps=torch.tensor(steps if steps is not None else [0] * n, dtype=torch.int64),
        all_greedy=temperature == 0,
    )


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert sample(logits, _batch(5, temperature=0)).tolist() == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(8, 50)
    assert sample(logits, _batch(8, top_k=1)).tolist() == logits.argmax(-1).tolist()
    assert sample(logits, _batch(8, top_p=1e-6)).tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_token_whatever_the_batch():
    torch.manual_seed(0)
    row = torch.randn(1, 300)
    alone = sample(row, _batch(1, seeds=[42], steps=[3]))
    crowd = torch.cat([torch.randn(4, 300), row, torch.randn(3, 300)])
    mixed = sample(crowd, _batch(8, seeds=[1, 2, 3, 4, 42, 5, 6, 7], steps=[0, 0, 0, 0, 3, 0, 0, 0]))
    assert mixed[4] == alone[0]


def test_different_seeds_and_steps_differ():
    logits = torch.zeros(64, 1000)  # uniform: collisions between 64 draws are unlikely
    draws = sample(logits, _batch(64, seeds=list(range(64))))
    assert len(set(draws.tolist())) > 50
    steps = sample(logits, _batch(64, seeds=[5] * 64, steps=list(range(64))))
    assert len(set(steps.tolist())) > 50


def test_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 8000
    logits = probs.log().repeat(n, 1)
    draws = sample(logits, _batch(n, seeds=list(range(n))))
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.025), freq


def test_top_k_and_top_p_restrict_support():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 2000
    logits = probs.log().repeat(n, 1)
    k2 = sample(logits, _batch(n, top_k=2, seeds=list(range(n))))
    assert set(k2.tolist()) == {0, 1}
    p = sample(logits, _batch(n, top_p=0.65, seeds=list(range(n))))  # 0.4 + 0.3 reaches 0.65
    assert set(p.tolist()) == {0, 1}
    cold = sample(logits, _batch(n, temperature=0.05, seeds=list(range(n))))
    assert (cold == 0).float().mean() > 0.99

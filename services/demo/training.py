"""Brief, deterministic CPU training for the demo model and demo adapters.

Full-batch training (every step sees the whole data set, in a fixed order), no dropout, AdamW,
torch's deterministic algorithms on: with the same torch build and thread count, the same
recipe gives the same weights bit for bit.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lorafleet.demo.recipe import DemoExample
from lorafleet.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID

IGNORE = -100  # label id that the loss skips


def corpus_sequences(tokenizer, corpus: str) -> list[list[int]]:
    """One training sequence per paragraph: <s> paragraph </s>."""
    paragraphs = [p.strip() for p in corpus.split("\n\n") if p.strip()]
    return [tokenizer(p).input_ids + [EOS_ID] for p in paragraphs]


def example_sequences(tokenizer, examples: Sequence[DemoExample]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels): the prompt tokenized alone, exactly as a request's prompt is, then the
    answer's tokens and EOS; only the answer and EOS are learned."""
    rows = []
    for example in examples:
        prompt = tokenizer(example.prompt).input_ids
        if prompt[0] != BOS_ID:
            raise RuntimeError("the demo tokenizer is expected to prepend <s>")
        answer = tokenizer(example.answer, add_special_tokens=False).input_ids + [EOS_ID]
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return rows


def _pad_batch(rows: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding: with causal attention, padding after a row's tokens cannot change them.
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, labels


def train(
    model: torch.nn.Module,
    rows: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    learning_rate: float,
    report: Callable[[str], None],
    label: str,
) -> float:
    """Full-batch AdamW on `rows` ((input ids, labels) pairs) for `steps` steps, with a short
    warm-up and cosine decay; only parameters with requires_grad train. Returns the last loss."""
    input_ids, labels = _pad_batch(rows)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if step % 20 == 0 or step == steps - 1:
            report(f"{label}: step {step + 1}/{steps} loss {loss_value:.3f}")
    model.eval()
    return loss_value

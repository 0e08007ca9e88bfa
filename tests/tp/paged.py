"""AttentionMeta for a step of several sequences in a small pool (each sequence owns fixed pages)."""

from __future__ import annotations

import torch

from lorafleet.engine.ops.base import AttentionMeta

BLOCK = 4
MAX_BLOCKS = 8  # pages per sequence: contexts up to 32 tokens


def step_meta(cached: list[int], new: list[int]) -> tuple[torch.Tensor, AttentionMeta]:
    """positions [T] and the meta of a step adding new[b] tokens after cached[b] ones to sequence b.

    Sequence b owns pages b*MAX_BLOCKS .. (b+1)*MAX_BLOCKS - 1 (so a later step finds its K/V).
    """
    positions, slots, query_start, seq_lens = [], [], [0], []
    for b, (c, n) in enumerate(zip(cached, new)):
        if c + n > BLOCK * MAX_BLOCKS:
            raise ValueError(f"sequence {b}: {c + n} tokens exceed the {BLOCK * MAX_BLOCKS} the test pool holds")
        for p in range(c, c + n):
            positions.append(p)
            slots.append((b * MAX_BLOCKS + p // BLOCK) * BLOCK + p % BLOCK)
        query_start.append(query_start[-1] + n)
        seq_lens.append(c + n)
    tables = torch.tensor([[b * MAX_BLOCKS + j for j in range(MAX_BLOCKS)] for b in range(len(new))], dtype=torch.int32)
    meta = AttentionMeta(
        query_start=torch.tensor(query_start, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        num_decodes=sum(n == 1 for n in new),
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        block_size=BLOCK,
    )
    return torch.tensor(positions, dtype=torch.int64), meta


def num_pages(num_seqs: int) -> int:
    return num_seqs * MAX_BLOCKS

"""Turn a SchedulerOutput into the tensors of one forward pass (built once, read by every layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory.adapter_cache import AdapterCache
from .memory.kv_cache import KVCacheManager
from .ops.base import AttentionMeta, LoraBatch
from .sampling import SamplingBatch
from .scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class ModelBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMeta
    lora: LoraBatch
    logits_index: torch.Tensor  # [N] int64: the token whose logits pick each sampled request's next token
    sampled: list[ScheduledRequest]  # the N requests that sample, in logits_index order
    sampling: SamplingBatch


def order_for_batch(out: SchedulerOutput, adapters: AdapterCache) -> list[ScheduledRequest]:
    """Single-token entries first (decode attention), then prefill chunks; each part grouped by
    adapter slot so that LoRA segments are as long as possible. Base-only requests sort last."""

    def key(e: ScheduledRequest):
        slot = adapters.slot_of(e.request.adapter_id) if e.request.adapter_id else None
        return (e.num_tokens != 1, 1 << 30 if slot is None else slot)

    return sorted(out.scheduled, key=key)


def build_batch(out: SchedulerOutput, kv: KVCacheManager, adapters: AdapterCache, device: torch.device) -> ModelBatch:
    entries = order_for_batch(out, adapters)
    bs = kv.block_size
    ids, pos, slots, token_slot = [], [], [], []
    query_start, seq_lens, tables, logits_index, sampled = [0], [], [], [], []
    num_decodes = 0
    seg_start, seg_len, seg_slot = [], [], []
    max_rank = 0
    for e in entries:
        req, c, n = e.request, e.request.num_computed_tokens, e.num_tokens
        t0 = len(ids)
        ids.extend(req.token_at(i) for i in range(c, c + n))
        pos.extend(range(c, c + n))
        table = kv.block_table(req.request_id)
        slots.extend(table[p // bs] * bs + p % bs for p in range(c, c + n))
        tables.append(table)
        query_start.append(t0 + n)
        seq_lens.append(c + n)
        num_decodes += n == 1
        slot = -1 if req.adapter_id is None else adapters.slot_of(req.adapter_id)
        token_slot.extend([slot] * n)
        if slot >= 0:
            max_rank = max(max_rank, adapters.max_rank_of(req.adapter_id))
            if seg_slot and seg_slot[-1] == slot and seg_start[-1] + seg_len[-1] == t0:
                seg_len[-1] += n  # same adapter continues: extend the segment
            else:
                seg_start.append(t0), seg_len.append(n), seg_slot.append(slot)
        if e.samples:
            logits_index.append(t0 + n - 1)
            sampled.append(e)
    # num_decodes counts single-token entries, which the ordering put first.
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.full((len(tables), max_blocks), -1, dtype=torch.int32)
    for b, t in enumerate(tables):
        block_tables[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
    i32 = dict(dtype=torch.int32, device=device)
    attn = AttentionMeta(
        query_start=torch.tensor(query_start, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decodes=num_decodes,
        max_query_len=max(e.num_tokens for e in entries),
        max_seq_len=max(seq_lens),
        block_size=bs,
    )
    lora = LoraBatch(
        token_slot=torch.tensor(token_slot, **i32),
        seg_start=torch.tensor(seg_start, **i32),
        seg_len=torch.tensor(seg_len, **i32),
        seg_slot=torch.tensor(seg_slot, **i32),
        max_rank=max_rank,
        max_seg_len=max(seg_len, default=0),
        num_segments=len(seg_slot),
    )
    return ModelBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(pos, dtype=torch.int64, device=device),
        attn=attn,
        lora=lora,
        logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
        sampled=sampled,
        sampling=_sampling_batch(sampled, device),
    )


def _sampling_batch(sampled: list[ScheduledRequest], device: torch.device) -> SamplingBatch:
    reqs = [e.request for e in sampled]
    return SamplingBatch(
        temperature=torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=device),
        top_p=torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=device),
        top_k=torch.tensor([r.params.top_k for r in reqs], dtype=torch.int64, device=device),
        seeds=torch.tensor([r.seed & ((1 << 63) - 1) for r in reqs], dtype=torch.int64, device=device),
        steps=torch.tensor([len(r.output_token_ids) for r in reqs], dtype=torch.int64, device=device),
        all_greedy=all(r.params.temperature == 0 for r in reqs),
    )

"""Turn a SchedulerOutput into the tensors of one forward pass (built once, read by every layer).

The per-token arrays are computed with numpy from per-request values (no Python loop over
tokens), packed into one host buffer and sent to the device in ONE copy; the ModelBatch fields are
views of that device buffer. On CUDA the host buffer is pinned, so the copy is asynchronous.

Asynchronous scheduling: a step may be built while the previous one still runs, so the token a
decode reads may not be known on the host yet (Request.num_pending). Its input id is then taken
on the device from the previous step's sampled ids (in_flight.InFlightStep), after the one copy: no host
round trip.

NOTE (staging reuse): the pinned staging buffer is reused by the next build; an event recorded
after each copy is waited on before the buffer is written again (a step that samples nothing does
not otherwise wait for its GPU work).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from .in_flight import InFlightStep
from .memory.adapter_cache import AdapterCache
from .memory.kv_cache import KVCacheManager
from .ops.base import AttentionMeta, LoraBatch
from .sampling import SamplingBatch
from .scheduler import ScheduledRequest, SchedulerOutput

_I63 = (1 << 63) - 1


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


class _Staging:
    """A growing host buffer (pinned on CUDA) for the one host-to-device copy of a step."""

    def __init__(self) -> None:
        self.host: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None  # the last copy out of `host`

    def send(self, parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
        """Concatenate int64 arrays, copy them to `device` at once; returns device views, one per part."""
        sizes = [len(p) for p in parts]
        total = sum(sizes)
        if device.type != "cuda":
            return list(torch.from_numpy(np.concatenate(parts)).split(sizes))
        if self.copied is not None:
            self.copied.synchronize()  # the previous copy has left the buffer (usually long done)
        if self.host is None or self.host.numel() < total:
            self.host = torch.empty(max(total, 2 * (0 if self.host is None else self.host.numel()), 1 << 14),
                                    dtype=torch.int64, pin_memory=True)
        np.concatenate(parts, out=self.host.numpy()[:total])
        dev = self.host[:total].to(device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return list(dev.split(sizes))


_staging = _Staging()


def build_batch(out: SchedulerOutput, kv: KVCacheManager, adapters: AdapterCache, device: torch.device,
                in_flight: InFlightStep | None = None) -> ModelBatch:
    """in_flight: the step still running, whose sampled ids feed this step's pending tokens."""
    entries = order_for_batch(out, adapters)
    bs, B = kv.block_size, len(entries)
    reqs = [e.request for e in entries]
    n = np.fromiter((e.num_tokens for e in entries), dtype=np.int64, count=B)  # new tokens per sequence
    c = np.fromiter((e.start for e in entries), dtype=np.int64, count=B)  # cached tokens
    slot = np.fromiter((-1 if r.adapter_id is None else adapters.slot_of(r.adapter_id) for r in reqs),
                       dtype=np.int64, count=B)
    ends = np.cumsum(n)
    T, starts = int(ends[-1]), ends - n
    seq_of_token = np.repeat(np.arange(B), n)  # [T]
    positions = np.arange(T, dtype=np.int64) - np.repeat(starts - c, n)  # [T]
    ids = np.fromiter(chain.from_iterable(_new_tokens(e) for e in entries), dtype=np.int64, count=T)
    # Pending tokens: the last token of a sequence's range (at most one per sequence, see Request).
    fed = [k for k, e in enumerate(entries) if e.start + e.num_tokens > e.request.num_known_tokens]
    feed_dst = (ends - 1)[fed] if fed else np.zeros(0, np.int64)  # [F] token index in this step
    if fed and in_flight is None:
        raise RuntimeError("a step reads a pending token but no step is in flight")
    feed_src = np.fromiter((in_flight.row_of(entries[k].request.request_id) for k in fed), np.int64, len(fed))
    # Block tables: every request's page list, flattened, then scattered into a [B, max_blocks] grid.
    tables = [kv.block_table(r.request_id) for r in reqs]
    lens = np.fromiter((len(t) for t in tables), dtype=np.int64, count=B)
    max_blocks = int(lens.max())
    block_tables = np.full((B, max_blocks), -1, dtype=np.int64)
    block_tables[np.arange(max_blocks) < lens[:, None]] = np.fromiter(chain.from_iterable(tables), np.int64, int(lens.sum()))
    slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs  # [T]
    # LoRA segments: runs of equal adapter slot (the ordering made them contiguous), adapters only.
    token_slot = np.repeat(slot, n)
    run_start = np.flatnonzero(np.diff(slot, prepend=-2) != 0)  # first sequence of each run of slots
    run_slot = slot[run_start]
    keep = run_slot >= 0
    seg_start = starts[run_start][keep]
    seg_lens = np.append(starts[run_start][1:], T)[keep] - seg_start
    seg_slot = run_slot[keep]
    samples = [e.samples for e in entries]
    sampled = [e for e in entries if e.samples]
    logits_index = (ends - 1)[np.array(samples, dtype=bool)]
    sreqs = [e.request for e in sampled]
    N = len(sampled)
    top_k = np.fromiter((r.params.top_k for r in sreqs), np.int64, N)
    seeds = np.fromiter((r.seed & _I63 for r in sreqs), np.int64, N)
    steps = np.fromiter((r.num_output_tokens - 1 for r in sreqs), np.int64, N)  # this step's token was counted
    query_start = np.concatenate(([0], ends))
    seq_lens = c + n
    (d_ids, d_pos, d_slots, d_qs, d_sl, d_bt, d_tslot, d_ss, d_sn, d_sslot, d_li, d_topk, d_seeds, d_steps,
     d_dst, d_src) = _staging.send(
        [ids, positions, slot_mapping, query_start, seq_lens, block_tables.reshape(-1), token_slot,
         seg_start, seg_lens, seg_slot, logits_index, top_k, seeds, steps, feed_dst, feed_src], device)
    if fed:  # on the device's stream, after the step in flight sampled them
        d_ids[d_dst] = in_flight.ids[d_src]
    i32 = torch.int32
    attn = AttentionMeta(
        query_start=d_qs.to(i32), seq_lens=d_sl.to(i32), block_tables=d_bt.view(B, max_blocks).to(i32),
        slot_mapping=d_slots, num_decodes=int((n == 1).sum()), max_query_len=int(n.max()),
        max_seq_len=int(seq_lens.max()), block_size=bs,
    )
    adapter_ids = {r.adapter_id for r in reqs if r.adapter_id is not None}
    max_rank = max((adapters.max_rank_of(a) for a in adapter_ids), default=0)
    lora = LoraBatch(
        token_slot=d_tslot.to(i32), seg_start=d_ss.to(i32), seg_len=d_sn.to(i32), seg_slot=d_sslot.to(i32),
        max_rank=max_rank, max_seg_len=int(seg_lens.max()) if len(seg_lens) else 0, num_segments=len(seg_slot),
        targets=frozenset().union(*(adapters.modules_of(a) for a in adapter_ids)),
    )
    all_greedy = all(r.params.temperature == 0 for r in sreqs)
    f32 = dict(dtype=torch.float32, device=device)
    sampling = SamplingBatch(
        # Temperatures and top-p only matter when someone samples: skip their copy for greedy steps.
        temperature=torch.zeros(N, **f32) if all_greedy else torch.tensor([r.params.temperature for r in sreqs], **f32),
        top_p=torch.ones(N, **f32) if all_greedy else torch.tensor([r.params.top_p for r in sreqs], **f32),
        top_k=d_topk, seeds=d_seeds, steps=d_steps, all_greedy=all_greedy,
    )
    return ModelBatch(input_ids=d_ids, positions=d_pos, attn=attn, lora=lora, logits_index=d_li,
                      sampled=sampled, sampling=sampling)


def _new_tokens(e: ScheduledRequest) -> list[int]:
    """The token ids this step computes for the entry: [c, c + n) of prompt + outputs, with 0 for
    a pending token (its value is fed on the device)."""
    r, c, n = e.request, e.start, e.num_tokens
    p, end = len(r.prompt_token_ids), min(c + n, r.num_known_tokens)
    if end <= p:
        ids = r.prompt_token_ids[c:end]
    elif c >= p:
        ids = r.output_token_ids[c - p : end - p]
    else:
        ids = r.prompt_token_ids[c:] + r.output_token_ids[: end - p]
    if c + n - end > 1:
        raise RuntimeError(f"request {r.request_id}: {c + n - end} pending tokens in one step (at most 1)")
    return ids + [0] * (c + n - end)

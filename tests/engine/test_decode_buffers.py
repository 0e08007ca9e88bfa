"""The static inputs the decode CUDA graphs replay (cuda_graphs.DecodeBuffers, one process and
under TP): a step's rows copied in, the rest of its bucket inert, nothing of an earlier, larger
step left where a kernel would read it. CPU only: the buffers are plain tensors."""

from __future__ import annotations

import torch

from lorafleet.engine.cuda_graphs import DecodeBuffers
from lorafleet.engine.ops.base import AttentionMeta, LoraBatch


def _i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def _step(n: int, width: int, lora: LoraBatch | None):
    attn = AttentionMeta(query_start=torch.arange(n + 1, dtype=torch.int32), seq_lens=_i32(*range(5, 5 + n)),
                         block_tables=torch.arange(n * width, dtype=torch.int32).view(n, width),
                         slot_mapping=torch.arange(100, 100 + n), num_decodes=n, max_query_len=1,
                         max_seq_len=4 + n, block_size=16)
    return torch.arange(10, 10 + n), torch.arange(20, 20 + n), attn, lora


def test_a_step_fills_its_rows_and_pads_its_bucket_inert():
    buf = DecodeBuffers(cap=8, max_blocks=4, device=torch.device("cpu"))
    two_segments = LoraBatch(token_slot=_i32(3, 3, 1, 1, -1, 2), seg_start=_i32(0, 2, 5), seg_len=_i32(2, 2, 1),
                             seg_slot=_i32(3, 1, 2), max_rank=8, max_seg_len=2, num_segments=3)
    buf.fill(8, *_step(6, 3, two_segments))
    assert buf.token_slot.tolist() == [3, 3, 1, 1, -1, 2, -1, -1] and buf.seg_len.tolist()[:3] == [2, 2, 1]
    buf.fill(4, *_step(3, 2, None))  # a smaller step without adapters, in bucket 4
    assert buf.input_ids[:3].tolist() == [10, 11, 12] and buf.positions[:3].tolist() == [20, 21, 22]
    assert buf.slot_mapping[:4].tolist() == [100, 101, 102, -1]  # row 3: no KV write
    assert buf.seq_lens[:4].tolist() == [5, 6, 7, 0]  # row 3: no attention
    assert buf.block_tables[:3, :2].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert buf.token_slot[:4].tolist() == [-1] * 4 and buf.seg_len[:4].tolist() == [0] * 4  # no LoRA at all
    meta, lora = buf.attention(4, 64, 16), buf.lora(4, max_rank=8)
    assert meta.num_decodes == 4 and meta.query_start.tolist() == [0, 1, 2, 3, 4] and meta.max_seq_len == 64
    assert lora.num_segments == 4 and lora.max_seg_len == 4 and lora.max_rank == 8

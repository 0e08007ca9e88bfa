"""Decode steps under tensor parallelism replayed from CUDA graphs, on every rank in lockstep.

Every rank captures one graph per (batch-size bucket, LoRA variant) of ITS part of a decode step: its kernels and
the collectives between them (NCCL calls are captured like kernels), over static buffers sized
for the largest bucket, as cuda_graphs.py does in one process. The driver marks a decode-only
step `graph=True` in the step header; every rank then copies the step's tensors (from the ints
broadcast) into its buffers, pads the bucket with inert rows (slot -1: no KV write; seq_len 0:
no attention; adapter slot -1 and empty segments: no LoRA) and replays the same bucket's graph,
so the collectives inside the graphs meet. Rank 0's graphs also compute the logits.

The LoRA part is captured at the rank capacity `max_rank` for the module groups of each variant
(cuda_graphs.LORA_VARIANTS: none, attention, all); every rank picks the variant from the step
header's targets, so all ranks replay the same collective sequence. The rank's adapter tables
must not be reallocated after capture: RankAdapterTables is built at the driver's slot and page
capacity (WorkerStart.max_slots, max_adapter_pages).

Capture and warm-up run the same bucket sequence on every rank (rank 0 after its workers are
ready, each worker right after reporting ready), so their collectives meet too.
capture=False (the CPU, gloo: no graphs): `run` executes the same padded forward eagerly, which
is what the CPU tests check against the eager path.
"""

from __future__ import annotations

import torch

from ..cuda_graphs import LORA_VARIANTS, DecodeBuffers, capture_graphs, graph_buckets, graph_key, graph_keys
from ..model import LlamaModel
from ..ops.base import AttentionMeta, LoraBatch
from ..ops.select import graph_ops
from .paged_lora import PagedLoraBatch
from .rank_runner import RankRunner


class TpDecodeGraphs:
    def __init__(self, runner: RankRunner, max_batch: int, max_rank: int, block_size: int, *,
                 capture: bool, with_logits: bool):
        spec = runner.spec
        self.runner, self.capture, self.with_logits = runner, capture, with_logits
        self.buckets = graph_buckets(max_batch)
        self.max_batch, self.max_rank, self.block_size = max_batch, max_rank, block_size
        self.buf = DecodeBuffers(max_batch, -(-spec.max_position // block_size), runner.pool.device)
        rm = runner.model
        shrink_ops, attn_ops = graph_ops(max_rank, spec.max_position)
        self.model = LlamaModel(spec, rm.w, None, attn_ops, rm.ew, rm.tp)
        # shrink and expand ops: two instances, as the eager path (each caches its own table checks)
        self.lora_ops = (shrink_ops, graph_ops(max_rank, spec.max_position)[0])
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (bucket, LoRA variant) -> graph
        self.out: dict[tuple[int, int], torch.Tensor] = {}  # -> [b, V] logits (rank 0) or [b, H] hidden
        self.replays = 0  # graph steps run (tests and metrics)
        if capture:
            self.graphs, self.out = capture_graphs(graph_keys(self.buckets), self._forward)

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        b, variant = key
        meta = self.buf.attention(b, self.runner.spec.max_position, self.block_size)
        targets = LORA_VARIANTS[variant]
        r = self.runner
        lora = None
        if targets:
            batch = self.buf.lora(b, self.max_rank, targets)
            lora = PagedLoraBatch(r.scheme, r.pool, r.tables, batch, *self.lora_ops, batch.targets)
        hidden = self.model.forward(self.buf.input_ids[:b], self.buf.positions[:b], r.pool, meta, lora)  # [b, H]
        return self.model.logits(hidden) if self.with_logits else hidden

    def release(self) -> None:
        """Free the captured graphs; idempotent. Must run before the process group is destroyed:
        a worker whose graphs were alive hung in destroy_process_group
        at close (their captured NCCL calls hold the communicator), and the driver in its join."""
        if self.capture and self.graphs:
            torch.cuda.synchronize()
            for graph in self.graphs.values():
                graph.reset()
        self.graphs, self.out = {}, {}

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMeta,
            lora: LoraBatch | None) -> torch.Tensor:
        """A decode-only step of n tokens (n <= max_batch): rank 0 -> logits [n, V], else hidden [n, H].

        The LoRA variant comes from lora.targets: the header's, the same on every rank."""
        n = input_ids.shape[0]
        if not (attn.num_decodes == n <= self.max_batch):
            raise ValueError(f"a graph step takes up to {self.max_batch} decodes, got {n} tokens, {attn.num_decodes} decodes")
        if lora is not None and lora.max_rank > self.max_rank:
            raise ValueError(f"the step's rank {lora.max_rank} exceeds the graphs' capacity {self.max_rank}")
        key = graph_key(self.buckets, n, lora)
        self.buf.fill(key[0], input_ids, positions, attn, lora)
        self.replays += 1
        if not self.capture:
            return self._forward(key)[:n]
        self.graphs[key].replay()
        return self.out[key][:n]

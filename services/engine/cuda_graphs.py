"""Decode steps replayed from CUDA graphs: no per-kernel launch cost from Python on the hot path.

One graph per (batch-size bucket, LoRA variant), captured once at start-up over static buffers
sized for the largest bucket; a decode step copies its metadata into the first n rows, pads the
bucket with inert rows (slot -1: no KV write; seq_len 0: no attention; adapter slot -1: no LoRA),
replays, and reads the output of its n rows. Prefill and mixed steps run eagerly.

The same class serves one device and every rank of a tensor-parallel group: under TP each rank
captures ITS part of the step, the collectives between its kernels included (NCCL calls are
captured like kernels); the driver marks a decode-only step `graph` in the step header and every
rank replays the same bucket's graph of the same LoRA variant, so the collectives inside meet.
Rank 0 (and one device) computes the logits, the other ranks stop at the hidden states.
capture=False (TP on the CPU, gloo: no graphs): `run` executes the same padded forward eagerly,
which is what the CPU tests check against the eager path.

LoRA variants (LORA_VARIANTS): which module groups run LoRA kernels in the graph. A step replays
the smallest variant that covers the modules its adapters target: otherwise every step would
run the LoRA kernels of all seven modules, which only exit where nothing is targeted
(docs/structure.md gives the measured cost).

NOTE: the captured model shares the eager model's weights, the pool and the slot tables (updated
in place; under TP built at the driver's slot and page capacity, never reallocated after
capture), so adapters loaded after capture are seen by every replay.
"""

from __future__ import annotations

import torch

from lorafleet.common.progress import progress
from lorafleet.formats.model_spec import LORA_MODULES

from .batch import ModelBatch
from .lora_step import LoraStep
from .model import LlamaModel
from .ops.base import AdapterTables, AttentionMeta, LoraBatch
from .ops.select import graph_ops
from .tp.shard_adapters import Scheme

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Module sets whose LoRA a graph runs, smallest first: none (base-only steps), attention (S-LoRA's
# q/k/v/o adapters, PEFT's default q/v), all seven.
LORA_VARIANTS = (frozenset(), frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}), frozenset(LORA_MODULES))


def lora_variant(targets: frozenset[str] | None) -> int:
    """Index of the smallest LORA_VARIANTS entry holding every targeted module (None: any module)."""
    if targets is None:
        return len(LORA_VARIANTS) - 1
    return next(i for i, v in enumerate(LORA_VARIANTS) if targets <= v)


def graph_keys(buckets: list[int]) -> list[tuple[int, int]]:
    """(bucket, variant) of every graph, smallest bucket first."""
    return [(b, v) for b in buckets for v in range(len(LORA_VARIANTS))]


def graph_key(buckets: list[int], n: int, lora: LoraBatch | None) -> tuple[int, int]:
    """The graph a decode step of n tokens replays: the smallest bucket >= n, and the smallest
    LoRA variant covering the batch's targets (lora None: no adapter in the step)."""
    return next(b for b in buckets if b >= n), lora_variant(lora.targets if lora is not None else frozenset())


def graph_buckets(max_batch: int) -> list[int]:
    """The batch sizes a graph is captured for, up to max_batch (a step runs in the smallest >= its size)."""
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


def replayable(batch: ModelBatch, max_batch: int) -> bool:
    """Can a decode graph of up to max_batch rows run this step (all decodes, every token sampled)?"""
    n = batch.input_ids.shape[0]
    return n <= max_batch and batch.attn.num_decodes == n and len(batch.sampled) == n


def capture_graphs(keys: list, forward) -> tuple[dict, dict]:
    """forward(key) run once per key outside capture (compiles every kernel; under TP also sets
    up the collectives), then captured per key in reverse order (keys smallest bucket first: the
    larger graphs are captured first and the smaller reuse their memory).
    -> (graph, output) per key. Under TP every rank calls this with the same keys."""
    mempool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for key in keys:
            forward(key)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs, outputs = {}, {}
    for key in progress(list(reversed(keys)), "capturing CUDA graphs", unit="graph"):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            outputs[key] = forward(key)
        graphs[key] = graph
    return graphs, outputs


class DecodeBuffers:
    """The static inputs of captured decode steps, `cap` rows: a step's n rows go into the first n
    and the rest of its bucket b is made inert (slot -1: no KV write; seq_len 0: no attention;
    adapter slot -1 and empty segments: no LoRA)."""

    def __init__(self, cap: int, max_blocks: int, device: torch.device):
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(cap, **i64)
        self.positions = torch.zeros(cap, **i64)
        self.slot_mapping = torch.full((cap,), -1, **i64)
        self.seq_lens = torch.zeros(cap, **i32)
        self.block_tables = torch.full((cap, max_blocks), -1, **i32)
        self.query_start = torch.arange(cap + 1, **i32)
        self.token_slot = torch.full((cap,), -1, **i32)
        self.seg_start, self.seg_len, self.seg_slot = (torch.zeros(cap, **i32) for _ in range(3))

    def attention(self, b: int, max_seq_len: int, block_size: int) -> AttentionMeta:
        return AttentionMeta(self.query_start[: b + 1], self.seq_lens[:b], self.block_tables[:b], self.slot_mapping[:b],
                             num_decodes=b, max_query_len=1, max_seq_len=max_seq_len, block_size=block_size)

    def lora(self, b: int, max_rank: int, targets: frozenset[str] | None = None) -> LoraBatch:
        return LoraBatch(self.token_slot[:b], self.seg_start[:b], self.seg_len[:b], self.seg_slot[:b],
                         max_rank=max_rank, max_seg_len=b, num_segments=b, targets=targets)

    def fill(self, b: int, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMeta,
             lora: LoraBatch | None) -> None:
        """Copy an all-decode step of n <= b tokens in; pad rows n..b-1 inert."""
        n = input_ids.shape[0]
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = attn.slot_mapping
        self.slot_mapping[n:b] = -1
        self.seq_lens[:n] = attn.seq_lens
        self.seq_lens[n:b] = 0
        self.block_tables[:n, : attn.block_tables.shape[1]] = attn.block_tables
        g = 0 if lora is None else lora.num_segments
        if lora is None:
            self.token_slot[:n] = -1
        else:
            self.token_slot[:n] = lora.token_slot
            self.seg_start[:g], self.seg_len[:g], self.seg_slot[:g] = lora.seg_start, lora.seg_len, lora.seg_slot
        self.token_slot[n:b] = -1
        self.seg_len[g:b] = 0


class DecodeGraphs:
    def __init__(self, model: LlamaModel, pool: torch.Tensor, tables: tuple[AdapterTables, AdapterTables],
                 max_batch: int, max_rank: int, block_size: int, *, scheme: Scheme = Scheme.FUSED,
                 capture: bool = True, with_logits: bool = True):
        """model: the eager model (its weights, elementwise ops and TP world are shared; the graphs
        get their own capture-mode attention and LoRA ops). tables: (shrink, expand) slot tables,
        one object twice on one device. max_rank: the LoRA capacity captured."""
        spec = model.spec
        self.buckets = graph_buckets(max_batch)
        self.max_batch, self.max_rank, self.block_size = max_batch, max_rank, block_size
        self.capture, self.with_logits = capture, with_logits
        self.buf = DecodeBuffers(max_batch, -(-spec.max_position // block_size), pool.device)
        shrink_ops, attn_ops = graph_ops(max_rank, spec.max_position)
        # two ops instances when the tables differ (each caches the checks of its own tables)
        expand_ops = shrink_ops if tables[0] is tables[1] else graph_ops(max_rank, spec.max_position)[0]
        self.model = LlamaModel(spec, model.w, attn_ops, model.ew, model.tp)
        self.pool, self.tables, self.scheme, self.lora_ops = pool, tables, scheme, (shrink_ops, expand_ops)
        self.variant_replays = [0] * len(LORA_VARIANTS)  # graph steps per LoRA variant (tests, metrics)
        # (bucket, LoRA variant) -> its graph, and the output it writes: logits [b, V] or hidden [b, H]
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.out: dict[tuple[int, int], torch.Tensor] = {}
        if capture:
            self.graphs, self.out = capture_graphs(graph_keys(self.buckets), self._forward)

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        b, variant = key
        meta = self.buf.attention(b, self.model.spec.max_position, self.block_size)
        targets = LORA_VARIANTS[variant]
        lora = None
        if targets:
            lora = LoraStep(self.pool, *self.tables, self.buf.lora(b, self.max_rank, targets), *self.lora_ops,
                            self.scheme)
        hidden = self.model.forward(self.buf.input_ids[:b], self.buf.positions[:b], self.pool, meta, lora)  # [b, H]
        return self.model.logits(hidden) if self.with_logits else hidden

    def can_run(self, batch: ModelBatch) -> bool:
        return replayable(batch, self.max_batch)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMeta,
            lora: LoraBatch | None) -> torch.Tensor:
        """A decode-only step of n <= max_batch tokens, every token sampled, in batch order ->
        logits [n, V] float32 (with_logits) or hidden [n, H]. The LoRA variant comes from
        lora.targets (under TP the step header's: the same on every rank)."""
        n = input_ids.shape[0]
        if not (attn.num_decodes == n <= self.max_batch):
            raise ValueError(f"a graph step takes up to {self.max_batch} decodes, got {n} tokens, {attn.num_decodes} decodes")
        lora = None if lora is None or lora.empty else lora
        if lora is not None and lora.max_rank > self.max_rank:
            raise ValueError(f"the step's rank {lora.max_rank} exceeds the graphs' capacity {self.max_rank}")
        key = graph_key(self.buckets, n, lora)
        self.buf.fill(key[0], input_ids, positions, attn, lora)
        self.variant_replays[key[1]] += 1
        if not self.capture:
            return self._forward(key)[:n]
        self.graphs[key].replay()
        return self.out[key][:n]

    def release(self) -> None:
        """Free the captured graphs; idempotent. Under TP it must run before the process group is
        destroyed: a worker whose graphs were alive hung in destroy_process_group at close (their
        captured NCCL calls hold the communicator), and the driver in its join."""
        if self.capture and self.graphs:
            torch.cuda.synchronize()
            for graph in self.graphs.values():
                graph.reset()
        self.graphs, self.out = {}, {}

"""The driver's side of a tensor-parallel engine: the Runtime LLMEngine runs on when tp_size > 1.

LLMEngine's step is unchanged: it schedules, builds the batch and calls `model.forward(...)` and
`model.logits(...)`. Here `model` is a TpDriverModel, which sends the step to the worker ranks
and runs rank 0's shard; the scheduler, the page allocator and the AdapterCache exist once, in
the driver. The AdapterCache is a TpAdapterCache: it counts an adapter's pages as the busiest
rank's share needs, packs adapters in the grouped form (grouped_adapter.py, in the host cache's
threads), and instead of writing an adapter into the pool it queues a load that every rank
applies (its own share, same pages, same slot) just before the next forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from lorafleet.common.embedded import free_port
from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import ModelSpec

from ..batch import ModelBatch
from ..config import EngineConfig
from ..cuda_graphs import DecodeGraphs, replayable
from ..lora_step import LoraStep
from ..memory.adapter_cache import AdapterCache, max_adapter_pages
from ..memory.allocator import PageAllocator
from ..memory.kv_cache import KVCacheManager
from ..memory.layout import PoolGeometry, adapter_layout
from ..memory.sizing import pool_pages
from ..ops.base import AttentionMeta, LoraBatch
from ..ops.select import is_triton, select_elementwise_ops, select_ops
from ..runtime import Runtime, resolve_device, resolve_dtype
from ..scheduler import SchedulerConfig
from . import wire
from .engine_workers import TpWorkerGroup, build_graphs, build_runner, run_step
from .grouped_adapter import GroupedAdapter, GroupedPacker
from .partition import check_world, local_spec
from .rank_runner import RankRunner, adapter_pages
from .shard_adapters import Scheme

# A collective (or a worker's start) waiting longer fails instead of hanging. Generous on purpose:
# on CUDA the first steps JIT-compile the Triton kernels on every rank (tens of seconds with a
# cold cache) while a rank that finished first waits at the next collective, and a worker's
# start includes CUDA, NCCL and its weight shard. A dead worker is caught at once regardless.
COLLECTIVE_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class _PendingLoad:
    msg: wire.AdapterLoad
    flat: torch.Tensor  # [n] pool dtype, on the pool's device: the grouped adapter (grouped_adapter.py)


class TpAdapterCache(AdapterCache):
    """The driver's AdapterCache: slots, pins and LRU as ever; pages and writes are per rank share."""

    def __init__(self, pool: torch.Tensor, allocator: PageAllocator, spec: ModelSpec, max_slots: int, max_rank: int,
                 world: int, scheme: Scheme, **host_args):
        """host_args: AdapterCache's packed_bytes and pack_threads."""
        super().__init__(pool, allocator, spec, max_slots, max_rank, packer=GroupedPacker(spec, pool.dtype),
                         **host_args)
        self.world, self.scheme = world, scheme
        self.pending: list[_PendingLoad] = []  # loads not yet sent to the ranks (flushed by the next forward)
        self._pages: dict[tuple, int] = {}  # ranks_by_module -> pages (W ShardLayouts each, asked every step)

    def pages_to_load(self, weights: LoraWeights) -> int:
        # Asked by the scheduler for waiting requests on every step: memoized per rank pattern.
        key = tuple(adapter_layout(weights, self.spec).ranks)  # per module; the layout is memoized on the weights
        n = self._pages.get(key)
        if n is None:
            ranks = weights.config.ranks_by_module()
            n = self._pages[key] = adapter_pages(self.spec, ranks, self.world, self.scheme, self.pool.shape[2])
        return n

    def _new_uploader(self) -> None:
        return None  # loads go to the ranks with the next step (_upload), never through a pinned ring

    def _upload(self, slot: int, pages: list[int], packed: GroupedAdapter) -> None:
        # Applied by every rank before the next forward. Safe to defer: no forward runs until then,
        # and the pages are this adapter's from now on (if it is evicted and its pages reused before
        # the flush, the later writes, KV or another load, land after this one). The copy is made
        # now (copy=True also on the CPU): the host cache may reuse the pack's buffer after this.
        msg = wire.AdapterLoad(slot=slot, pages=list(pages), ranks_by_module=packed.ranks_by_module,
                               targets=packed.targets)
        self.pending.append(_PendingLoad(msg, packed.buf.to(self.pool.device, copy=True)))


class TpDriverModel:
    """model.forward / model.logits for LLMEngine.step, over all ranks (rank 0 runs here); with
    decode graphs also the engine's `decode_graphs` (can_run / run / max_batch, as cuda_graphs.DecodeGraphs)."""

    def __init__(self, runner: RankRunner, group: TpWorkerGroup, adapters: TpAdapterCache,
                 graphs: DecodeGraphs | None = None):
        self.runner, self.group, self.adapters, self.graphs = runner, group, adapters, graphs

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, attn: AttentionMeta,
                lora: LoraStep | None) -> torch.Tensor:
        return self._step(input_ids, positions, attn, None if lora is None else lora.batch, graph=False)

    def can_run(self, batch: ModelBatch) -> bool:
        return self.graphs is not None and replayable(batch, self.graphs.max_batch)

    @property
    def max_batch(self) -> int:
        return self.graphs.max_batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMeta,
            lora: LoraBatch | None) -> torch.Tensor:
        """Logits [n, V] of an all-decode step, every rank replaying its graph of the bucket."""
        return self._step(input_ids, positions, attn, lora, graph=True)

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMeta,
              batch: LoraBatch | None, graph: bool) -> torch.Tensor:
        loads, self.adapters.pending = self.adapters.pending, []
        batch = None if batch is None or batch.empty else batch
        step_lora = None
        if batch is not None:
            # targets: build_batch's, from the requests' adapters on the host (no device read).
            if batch.targets is None:
                raise ValueError("a TP step needs the batch's LoRA targets (build_batch sets them)")
            step_lora = wire.StepLora(num_segments=batch.num_segments, max_rank=batch.max_rank,
                                      max_seg_len=batch.max_seg_len, targets=sorted(batch.targets))
        step = wire.Step(
            num_tokens=input_ids.shape[0], num_seqs=attn.num_seqs, max_blocks=attn.block_tables.shape[1],
            num_decodes=attn.num_decodes, max_query_len=attn.max_query_len, max_seq_len=attn.max_seq_len,
            block_size=attn.block_size, lora=step_lora, loads=[p.msg for p in loads], graph=graph,
        )
        ints = wire.pack_ints(input_ids, positions, attn, batch)
        flat = torch.cat([p.flat for p in loads]) if len(loads) > 1 else (loads[0].flat if loads else None)
        self.group.send(step)
        return run_step(self.runner, step, ints, flat, self.graphs)  # hidden [T, H] (graph: logits [T, V])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.runner.logits(hidden)  # [N, V] float32: lm_head is replicated, rank 0 samples


def build_tp_runtime(cfg: EngineConfig) -> Runtime:
    from transformers import AutoTokenizer


    model_dir = Path(cfg.model_dir)
    spec = ModelSpec.from_pretrained(model_dir)
    check_world(spec, cfg.tp_size)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(f"with tp_size > 1 rank r runs on cuda:r; device must be cuda or auto, got {cfg.device!r}")
    if device.type == "cuda" and torch.cuda.device_count() < cfg.tp_size:
        raise ValueError(f"tp_size {cfg.tp_size} needs {cfg.tp_size} GPUs, {torch.cuda.device_count()} are visible")
    dtype = resolve_dtype(cfg.dtype, device)
    spec_loc = local_spec(spec, cfg.tp_size)
    geom_loc = PoolGeometry.for_model(spec_loc, 1, cfg.block_size)  # one page of a rank's pool
    num_pages = pool_pages(cfg, geom_loc, dtype, device)
    if device.type == "cuda" and not cfg.num_pages:
        # Sized before any rank loads its shard (every rank needs the number up front), so the
        # shard's bytes are taken off the free memory pool_pages saw.
        page_bytes = geom_loc.page_bytes(dtype.itemsize)
        num_pages = max(1, num_pages - _shard_bytes(spec, cfg.tp_size, dtype.itemsize) // page_bytes)
    # As select_ops: auto is Triton on CUDA; "triton" on the CPU runs the kernels under the interpreter.
    attn_kind = "torch" if cfg.ops == "torch" or (cfg.ops == "auto" and device.type != "cuda") else "triton"
    if attn_kind == "triton":  # fall back to torch ops when the kernels cannot be imported
        attn_kind = "triton" if is_triton(select_ops(cfg.ops, device)[1]) else "torch"
    # The fused elementwise kernels where the Triton ops run (elementwise_ops auto), as in one process.
    ew_kind = "torch" if cfg.elementwise_ops == "torch" or attn_kind == "torch" else "triton"
    if ew_kind == "triton":  # (torch when the kernels cannot be imported here)
        ew_kind = "triton" if is_triton(select_elementwise_ops(cfg.elementwise_ops, "triton", device)) else "torch"
    slots = cfg.max_adapter_slots or max(64, 2 * cfg.max_num_seqs)
    graphs_on = cfg.cuda_graphs and cfg.tp_cuda_graphs and attn_kind == "triton" and ew_kind == "triton"
    start = wire.WorkerStart(
        model_dir=str(model_dir), spec_json=msgspec.json.encode(spec), world=cfg.tp_size, rank=0,
        init_method=f"tcp://127.0.0.1:{free_port()}", backend="nccl" if device.type == "cuda" else "gloo",
        device=device.type, dtype=str(dtype).removeprefix("torch."), attn_ops=attn_kind,
        scheme=cfg.tp_lora_scheme, num_pages=num_pages, block_size=cfg.block_size,
        random_weights_seed=cfg.random_weights_seed, timeout_s=COLLECTIVE_TIMEOUT_S, elementwise_ops=ew_kind,
        # Every rank's share of an adapter is within the driver AdapterCache's bound, in a rank's pages.
        max_slots=slots, max_adapter_pages=max_adapter_pages(spec, cfg.max_adapter_rank, geom_loc.page_elems),
        graph_max_batch=min(cfg.max_num_seqs, cfg.max_batched_tokens) if graphs_on else 0,
        graph_max_rank=cfg.max_adapter_rank,
    )
    group = TpWorkerGroup(start)  # workers load their shards while rank 0 loads its own
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        runner = build_runner(start, spec)
        allocator = PageAllocator(num_pages)
        adapters = TpAdapterCache(runner.pool, allocator, spec, slots, cfg.max_adapter_rank, cfg.tp_size,
                                  Scheme(cfg.tp_lora_scheme), packed_bytes=cfg.packed_adapter_bytes,
                                  pack_threads=cfg.adapter_pack_threads)
        kv = KVCacheManager(allocator, adapters, cfg.block_size)
        group.wait_ready()
        graphs = build_graphs(runner, start)  # the workers capture theirs from when they are ready
    except BaseException:
        group.close()
        raise
    # As in one process: split phases (decode-only steps a graph replays) when there are graphs.
    split = cfg.decode_steps_per_prefill
    if split is None:
        split = 4 if graphs is not None else 0
    sched = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_batched_tokens=cfg.max_batched_tokens,
                            decode_steps_per_prefill=split)
    model = TpDriverModel(runner, group, adapters, graphs)

    def close() -> None:
        if graphs is not None:
            graphs.release()  # before the group is destroyed (DecodeGraphs.release)
        group.close()

    return Runtime(spec, tokenizer, runner.pool.device, runner.pool, model, runner.shrink_ops, kv, adapters, sched,
                   model if graphs is not None else None, close=close)


def _shard_bytes(spec: ModelSpec, world: int, elem_bytes: int) -> int:
    """One rank's weight bytes: its slice of every layer plus the replicated embedding and head."""
    H, I = spec.hidden_size, spec.intermediate_size
    layer = H * (spec.q_width + 2 * spec.kv_width) + H * spec.q_width + 3 * H * I
    return (spec.num_layers * layer // world + 2 * spec.vocab_size * H) * elem_bytes

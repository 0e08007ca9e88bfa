"""Assembling a one-device engine's parts from its EngineConfig: model, unified pool, caches, ops,
graphs. tp_size > 1 is assembled by tp/engine_runtime.py, on top of this module's helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lorafleet.formats.model_spec import ModelSpec

from .config import EngineConfig
from .memory.adapter_cache import AdapterCache
from .memory.allocator import PageAllocator
from .memory.kv_cache import KVCacheManager
from .memory.layout import PoolGeometry
from .memory.sizing import pool_pages
from .model import LlamaModel
from .ops.base import LoraOps
from .ops.select import is_triton, select_elementwise_ops, select_ops
from .scheduler import SchedulerConfig
from .weights_loader import load_weights, random_weights

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Runtime:
    spec: ModelSpec
    tokenizer: Any
    device: torch.device
    pool: torch.Tensor
    model: LlamaModel
    lora_ops: LoraOps  # what the eager steps' LoraStep runs (under TP the driver's rank 0 ops)
    kv: KVCacheManager
    adapters: AdapterCache
    scheduler_config: SchedulerConfig
    decode_graphs: Any  # DecodeGraphs | None (under TP the driver model: can_run / run / max_batch)
    close: Callable[[], None] | None = None  # ends what the runtime started (TP worker processes)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA GPU is available")
    return dev


def cpu_threads(cfg: EngineConfig) -> int:
    """torch threads for an engine on the CPU: cfg.cpu_threads, or every core this process may use but one."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    return max(1, len(os.sched_getaffinity(0)) - 1)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def build_runtime(cfg: EngineConfig) -> Runtime:
    if cfg.tp_size > 1:
        raise ValueError("tp_size > 1 is assembled by tp.engine_runtime.build_tp_runtime (LLMEngine picks it)")
    from transformers import AutoTokenizer

    model_dir = Path(cfg.model_dir)
    spec = ModelSpec.from_pretrained(model_dir)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if cfg.random_weights_seed is None:
        weights = load_weights(model_dir, spec, dtype, device)
    else:
        weights = random_weights(spec, dtype, device, cfg.random_weights_seed)
    num_pages = pool_pages(cfg, PoolGeometry.for_model(spec, 1, cfg.block_size), dtype, device)
    geom = PoolGeometry.for_model(spec, num_pages, cfg.block_size)
    pool = torch.zeros(spec.num_layers, num_pages, geom.page_elems, dtype=dtype, device=device)
    allocator = PageAllocator(num_pages)
    slots = cfg.max_adapter_slots or max(64, 2 * cfg.max_num_seqs)
    adapters = AdapterCache(pool, allocator, spec, slots, cfg.max_adapter_rank, packed_bytes=cfg.packed_adapter_bytes,
                             pack_threads=cfg.adapter_pack_threads)
    kv = KVCacheManager(allocator, adapters, cfg.block_size)
    lora_ops, attn_ops = select_ops(cfg.ops, device)
    elementwise = select_elementwise_ops(cfg.elementwise_ops, cfg.ops, device)
    model = LlamaModel(spec, weights, attn_ops, elementwise)
    graphs = None
    # The graphs replay the Triton LoRA and fused elementwise kernels: both must be the Triton ones.
    if cfg.cuda_graphs and device.type == "cuda" and is_triton(lora_ops) and is_triton(elementwise):
        from .cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(model, pool, (adapters.tables, adapters.tables),
                              max_batch=min(cfg.max_num_seqs, cfg.max_batched_tokens),
                              max_rank=cfg.max_adapter_rank, block_size=cfg.block_size)
    split = cfg.decode_steps_per_prefill
    if split is None:
        split = 4 if graphs is not None else 0
    sched = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_batched_tokens=cfg.max_batched_tokens,
                            decode_steps_per_prefill=split)
    return Runtime(spec, tokenizer, device, pool, model, lora_ops, kv, adapters, sched, graphs)

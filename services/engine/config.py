"""Engine configuration and the assembly of its parts (model, pool, caches, ops)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .memory.adapter_cache import AdapterCache
from .memory.allocator import PageAllocator
from .memory.kv_cache import KVCacheManager
from .memory.layout import PoolGeometry
from .model import LlamaModel, TorchElementwiseOps
from .model_spec import ModelSpec
from .scheduler import SchedulerConfig
from .weights_loader import load_weights, random_weights

_TP_SCHEMES = ("fused", "slora", "replicated_a", "gather_outputs")  # tp.Scheme's values
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    num_pages: int = 0  # 0: size the pool from memory (gpu_memory_fraction / cpu_pool_bytes)
    block_size: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    max_adapter_rank: int = 256
    max_adapter_slots: int = 0  # 0: 2 * max_num_seqs, at least 64
    # Host bytes of packed adapters ready for one copy to the pool (LRU): a reload after
    # eviction costs one memcpy + DMA, not a repack (memory/adapter_pack.py).
    packed_adapter_bytes: int = 2 << 30
    adapter_pack_threads: int = 4  # CUDA: threads packing adapters beside the engine loop
    gpu_memory_fraction: float = 0.90
    cpu_pool_bytes: int = 1 << 30
    # torch intra-op threads on the CPU device (set for the whole process); 0: every core but one.
    # The core left over runs what surrounds the engine (the service's event loop, Kafka, Redis);
    # with all cores taken the service's steps ran up to 2x slower than the engine's alone.
    cpu_threads: int = 0
    ops: str = "auto"  # auto (triton on CUDA when available) | torch | triton
    # RMSNorm / RoPE / SiLU-and-mul / residual adds: auto follows `ops` (fused Triton kernels where
    # the Triton ops run); torch runs the torch sequence, eagerly (no decode CUDA graphs, which
    # replay the fused kernels). Under tp_size > 1 every rank's model follows the same choice.
    elementwise_ops: str = "auto"  # auto | torch | triton
    random_weights_seed: int | None = None  # benchmarks: random weights made on the device, no checkpoint
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA with the Triton ops only)
    # Decode-only steps between prefill steps; None: 4 when CUDA graphs replay decodes, else 0
    # (0: every step mixes decodes with prefill chunks).
    decode_steps_per_prefill: int | None = None
    # Tensor parallelism (docs/tp.md): W processes, one per GPU (NCCL) or on the CPU (gloo); the
    # driver (this process) is rank 0.
    tp_size: int = 1
    tp_lora_scheme: str = "fused"  # fused | slora | replicated_a | gather_outputs (docs/tp.md)
    # Decode CUDA graphs under tp_size > 1 (tp/graphs.py; with cuda_graphs and the Triton ops).
    # Greedy tokens equal the one-GPU engine's with LoRA at W = 2 under every scheme (H200s,
    # d18f232), and W = 2 serves 1.12x one GPU with them, 0.58x without (docs/tp.md). On the CPU
    # the same padded steps run eagerly (what the CPU tests check).
    tp_cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.adapter_pack_threads < 1:
            raise ValueError(f"adapter_pack_threads must be >= 1, got {self.adapter_pack_threads}")
        if self.max_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_batched_tokens and max_num_seqs must be >= 1")
        if self.ops not in ("auto", "torch", "triton"):
            raise ValueError(f"ops must be auto, torch or triton, got {self.ops!r}")
        if self.elementwise_ops not in ("auto", "torch", "triton"):
            raise ValueError(f"elementwise_ops must be auto, torch or triton, got {self.elementwise_ops!r}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0 (0: all cores but one), got {self.cpu_threads}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.tp_lora_scheme not in _TP_SCHEMES:
            raise ValueError(f"tp_lora_scheme must be one of {', '.join(_TP_SCHEMES)}; got {self.tp_lora_scheme!r}")


@dataclass
class Runtime:
    spec: ModelSpec
    tokenizer: Any
    device: torch.device
    pool: torch.Tensor
    model: LlamaModel
    kv: KVCacheManager
    adapters: AdapterCache
    scheduler_config: SchedulerConfig
    decode_graphs: Any  # DecodeGraphs | None
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


class TritonOpsUnavailable(RuntimeError):
    """The Triton ops were due (a CUDA device, ops auto or triton) but could not be imported."""


def _triton_ops_import_error(exc: ImportError) -> TritonOpsUnavailable:
    # Loud on purpose: a silent fall back to the torch reference ops on a GPU serves at a fraction
    # of the speed (a shadowed or broken install looked like a healthy engine before).
    return TritonOpsUnavailable(
        f"the Triton ops (lorafleet.kernels) could not be imported on a CUDA device: {exc}; "
        "fix the install, or ask for the torch reference ops with --ops torch (LORAFLEET_OPS=torch)")


def select_ops(kind: str, device: torch.device):
    """(lora_ops, attention_ops): Triton on CUDA unless ``kind`` is "torch"; torch elsewhere.

    "triton" on the CPU runs the kernels under the Triton interpreter (tests). A failed Triton
    import raises TritonOpsUnavailable; it never falls back to torch ops by itself.
    """
    from .ops.torch_ref import TorchAttentionOps, TorchLoraOps

    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return TorchLoraOps(), TorchAttentionOps()
    try:
        from lorafleet.kernels.attention_ops import TritonAttentionOps
        from lorafleet.kernels.lora_ops import TritonLoraOps
    except ImportError as exc:
        raise _triton_ops_import_error(exc) from exc
    return TritonLoraOps(), TritonAttentionOps()


def select_elementwise_ops(kind: str, ops_kind: str, device: torch.device):
    """TritonElementwiseOps or TorchElementwiseOps, chosen like select_ops (kind auto: as ops_kind)."""
    if kind == "auto":
        kind = ops_kind
    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return TorchElementwiseOps()
    try:
        from lorafleet.kernels.fused_ops import TritonElementwiseOps
    except ImportError as exc:
        raise _triton_ops_import_error(exc) from exc
    return TritonElementwiseOps()


def _num_pages(cfg: EngineConfig, geom_one: PoolGeometry, dtype: torch.dtype, device: torch.device) -> int:
    if cfg.num_pages:
        return cfg.num_pages
    page_bytes = geom_one.page_bytes(torch.tensor([], dtype=dtype).element_size())
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * cfg.gpu_memory_fraction) - (1 << 30)  # headroom for activations
    else:
        budget = cfg.cpu_pool_bytes
    return max(1, budget // page_bytes)


def build_runtime(cfg: EngineConfig) -> Runtime:
    if cfg.tp_size > 1:
        from .tp.engine_runtime import build_tp_runtime

        return build_tp_runtime(cfg)
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
    num_pages = _num_pages(cfg, PoolGeometry.for_model(spec, 1, cfg.block_size), dtype, device)
    geom = PoolGeometry.for_model(spec, num_pages, cfg.block_size)
    pool = torch.zeros(spec.num_layers, num_pages, geom.page_elems, dtype=dtype, device=device)
    allocator = PageAllocator(num_pages)
    slots = cfg.max_adapter_slots or max(64, 2 * cfg.max_num_seqs)
    adapters = AdapterCache(pool, allocator, spec, slots, cfg.max_adapter_rank, packed_bytes=cfg.packed_adapter_bytes,
                             pack_threads=cfg.adapter_pack_threads)
    kv = KVCacheManager(allocator, adapters, cfg.block_size)
    lora_ops, attn_ops = select_ops(cfg.ops, device)
    elementwise = select_elementwise_ops(cfg.elementwise_ops, cfg.ops, device)
    model = LlamaModel(spec, weights, lora_ops, attn_ops, elementwise)
    graphs = None
    fused = type(elementwise).__name__ == "TritonElementwiseOps"  # what the graphs' model replays
    if cfg.cuda_graphs and device.type == "cuda" and type(lora_ops).__name__ == "TritonLoraOps" and fused:
        from .cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(spec, weights, pool, adapters.tables, max_batch=min(cfg.max_num_seqs, cfg.max_batched_tokens),
                              max_rank=cfg.max_adapter_rank, block_size=cfg.block_size)
    split = cfg.decode_steps_per_prefill
    if split is None:
        split = 4 if graphs is not None else 0
    sched = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_batched_tokens=cfg.max_batched_tokens,
                            decode_steps_per_prefill=split)
    return Runtime(spec, tokenizer, device, pool, model, kv, adapters, sched, graphs)

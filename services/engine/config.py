"""EngineConfig: every setting of one engine, declared and validated here and nowhere else.
Assembling an engine from it is runtime.py's job."""

from __future__ import annotations

from dataclasses import dataclass

_TP_SCHEMES = ("fused", "slora", "replicated_a", "gather_outputs")  # tp.Scheme's values


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
    # Decode CUDA graphs under tp_size > 1 (tp/graphs.py; with cuda_graphs and the Triton ops);
    # their equality with the one-GPU engine and their speed are measured in docs/tp.md. On the
    # CPU the same padded steps run eagerly (what the CPU tests check).
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

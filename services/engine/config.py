"""EngineConfig: every setting of one engine. Each knob's type, default and help are declared once,
as its LORAFLEET_* variable in common/settings.py; the engine's flags (`lorafleet engine --help`)
are derived from these fields (settings.add_config_flags). Assembling an engine from a config is
runtime.py's job."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.common import settings

_TP_SCHEMES = ("fused", "slora")  # production's tp.Scheme values
_TP_RESEARCH_SCHEMES = ("replicated_a", "gather_outputs")  # the other two, compared in docs/tp.md


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    device: str = settings.config_field("DEVICE")  # auto | cpu | cuda | cuda:N
    dtype: str = settings.config_field("DTYPE")  # auto: bfloat16 on CUDA, float32 on the CPU
    # 0: size the pool from memory (gpu_memory_fraction / cpu_pool_bytes)
    num_pages: int = settings.config_field("POOL_PAGES")
    block_size: int = settings.config_field("BLOCK_SIZE")
    max_num_seqs: int = settings.config_field("MAX_NUM_SEQS")
    max_batched_tokens: int = settings.config_field("MAX_BATCHED_TOKENS")
    max_adapter_rank: int = settings.config_field("MAX_ADAPTER_RANK")
    max_adapter_slots: int = settings.config_field("MAX_ADAPTER_SLOTS")  # 0: 2 * max_num_seqs, at least 64
    # Host bytes of packed adapters ready for one copy to the pool (LRU): a reload after
    # eviction costs one memcpy + DMA, not a repack (memory/adapter_pack.py); 0: sized to the work
    # (memory/host_budget.py).
    packed_adapter_bytes: int = settings.config_field("ENGINE_PACKED_ADAPTER_BYTES")
    # CUDA: threads packing adapters beside the engine loop
    adapter_pack_threads: int = settings.config_field("ENGINE_ADAPTER_PACK_THREADS")
    gpu_memory_fraction: float = settings.config_field("GPU_MEMORY_FRACTION")
    cpu_pool_bytes: int = settings.config_field("CPU_POOL_BYTES")
    # torch intra-op threads on the CPU device (set for the whole process); 0: every core but one.
    # The core left over runs what surrounds the engine (the service's event loop, Kafka, Redis);
    # with all cores taken the service's steps ran up to 2x slower than the engine's alone.
    cpu_threads: int = settings.config_field("CPU_THREADS")
    ops: str = settings.config_field("OPS")  # auto (triton on CUDA when available) | torch | triton
    # RMSNorm / RoPE / SiLU-and-mul / residual adds: auto follows `ops` (fused Triton kernels where
    # the Triton ops run); torch runs the torch sequence, eagerly (no decode CUDA graphs, which
    # replay the fused kernels). Under tp_size > 1 every rank's model follows the same choice.
    elementwise_ops: str = settings.config_field("ELEMENTWISE_OPS")  # auto | torch | triton
    # benchmarks: random weights made on the device, no checkpoint
    random_weights_seed: int | None = settings.config_field("RANDOM_WEIGHTS_SEED")
    # replay decode steps from CUDA graphs (CUDA with the Triton ops only)
    cuda_graphs: bool = settings.config_field("CUDA_GRAPHS")
    # The host schedules and builds step t+1 while step t runs (engine.py); off: one step at a time
    async_scheduling: bool = settings.config_field("ASYNC_SCHEDULING")
    # Decode-only steps between prefill steps; None: 4 when CUDA graphs replay decodes, else 0
    # (0: every step mixes decodes with prefill chunks).
    decode_steps_per_prefill: int | None = settings.config_field("DECODE_STEPS_PER_PREFILL")
    # Tensor parallelism (docs/tp.md): W processes, one per GPU (NCCL) or on the CPU (gloo); the
    # driver (this process) is rank 0.
    tp_size: int = settings.config_field("TP_SIZE")
    # fused | slora | replicated_a | gather_outputs (docs/tp.md)
    tp_lora_scheme: str = settings.config_field("TP_LORA_SCHEME")
    # Decode CUDA graphs under tp_size > 1 (cuda_graphs.DecodeGraphs on every rank; with cuda_graphs and the Triton ops);
    # their equality with the one-GPU engine and their speed are measured in docs/tp.md. On the
    # CPU the same padded steps run eagerly (what the CPU tests check).
    tp_cuda_graphs: bool = settings.config_field("TP_CUDA_GRAPHS")
    tp_research_schemes: bool = settings.config_field("TP_RESEARCH_SCHEMES")  # benchmarks and tests only

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
        if self.tp_lora_scheme in _TP_RESEARCH_SCHEMES and not self.tp_research_schemes:
            raise ValueError(f"tp_lora_scheme {self.tp_lora_scheme!r} is for benchmarks only (set tp_research_schemes, "
                             "LORAFLEET_TP_RESEARCH_SCHEMES=1); production runs fused or slora")
        if self.tp_lora_scheme not in _TP_SCHEMES + _TP_RESEARCH_SCHEMES:
            raise ValueError(f"tp_lora_scheme must be one of {', '.join(_TP_SCHEMES)}; got {self.tp_lora_scheme!r}")

"""Configuration of the engine service (`lorafleet engine`): flags with LORAFLEET_* defaults."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.common import settings

if TYPE_CHECKING:  # importing the engine config pulls in torch: probes parse flags without it
    from lorafleet.engine.config import EngineConfig


@dataclass(frozen=True)
class EngineServiceConfig:
    kafka_bootstrap: str
    redis_url: str
    store_address: str
    engine: EngineConfig
    work_topic: str = "lorafleet.work"
    work_partitions: int = 8
    group_id: str = "lorafleet-engines"
    engine_id: str = ""
    drain_timeout_s: float = 30.0
    max_inflight: int = 1024  # messages held (queued + running) before the consumer pauses
    adapter_unavailable_s: float = 60.0  # give up on an adapter the store cannot serve after this
    session_timeout_ms: int = 10000
    # A step running longer than this is a hang (a GPU fault, a TP collective or decode graph
    # waiting for a dead rank): the liveness heartbeat is withheld so Kubernetes restarts the pod.
    # Above the TP collective timeout (180 s), so a failure that raises does so first.
    step_stall_s: float = 300.0
    # Load shedding: a request with no token yet this long after ingest took it ends `overloaded`.
    max_queue_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.drain_timeout_s <= 0:
            raise ValueError("max_inflight must be >= 1 and drain_timeout_s > 0")
        if self.step_stall_s <= 0 or self.max_queue_s <= 0:
            raise ValueError(f"step_stall_s and max_queue_s must be > 0, got {self.step_stall_s}, {self.max_queue_s}")

    @property
    def name(self) -> str:
        return self.engine_id or f"{socket.gethostname()}-{os.getpid()}"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:

        settings.add_flag(parser, "--kafka-bootstrap", "KAFKA_BOOTSTRAP", str, "Kafka bootstrap servers")
        settings.add_flag(parser, "--redis-url", "REDIS_URL", str, "Redis URL of the reply streams")
        settings.add_flag(parser, "--model", "MODEL", str, "Hugging Face model folder")
        settings.add_flag(parser, "--store-address", "STORE_ADDRESS", str, "host:port of this node's adapter store")
        settings.add_flag(parser, "--work-topic", "WORK_TOPIC", str, "engines' work topic")
        settings.add_flag(parser, "--work-partitions", "WORK_PARTITIONS", int, "work topic partitions, when created")
        settings.add_flag(parser, "--group-id", "ENGINE_GROUP", str, "consumer group of the engines")
        settings.add_flag(parser, "--engine-id", "ENGINE_ID", str, "this engine's name")
        settings.add_flag(parser, "--device", "DEVICE", str, "cpu, cuda or auto")
        settings.add_flag(parser, "--dtype", "DTYPE", str, "auto, bfloat16, float16 or float32")
        settings.add_flag(parser, "--pool-pages", "POOL_PAGES", int, "pages in the unified pool (0: from memory)")
        settings.add_flag(parser, "--block-size", "BLOCK_SIZE", int, "tokens per KV page")
        settings.add_flag(parser, "--max-num-seqs", "MAX_NUM_SEQS", int, "most requests in one batch")
        settings.add_flag(parser, "--max-batched-tokens", "MAX_BATCHED_TOKENS", int, "token budget of one step")
        settings.add_flag(parser, "--max-adapter-rank", "MAX_ADAPTER_RANK", int, "largest LoRA rank accepted")
        settings.add_flag(parser, "--cpu-threads", "CPU_THREADS", int, "torch threads on the CPU device (0: all cores but one)")
        settings.add_flag(parser, "--gpu-memory-fraction", "GPU_MEMORY_FRACTION", float, "share of GPU memory for the pool")
        settings.add_flag(parser, "--ops", "OPS", str, "op implementations: auto, torch, triton")
        settings.add_flag(parser, "--tp-size", "TP_SIZE", int, "tensor-parallel size: GPUs (processes) this engine spans")
        settings.add_flag(parser, "--tp-lora-scheme", "TP_LORA_SCHEME", str, "adapter sharding under tensor parallelism")
        settings.add_flag(parser, "--drain-timeout-s", "DRAIN_TIMEOUT_S", float, "drain limit on SIGTERM")

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_dir: Path | str | None = None) -> "EngineServiceConfig":
        model = model_dir if model_dir is not None else args.model
        if not model:
            raise ValueError("the engine needs a model folder: pass --model or set LORAFLEET_MODEL")
        from lorafleet.engine.config import EngineConfig

        engine = EngineConfig(
            model_dir=str(model), device=args.device, dtype=args.dtype, num_pages=args.pool_pages,
            block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_batched_tokens=args.max_batched_tokens, max_adapter_rank=args.max_adapter_rank,
            cpu_threads=args.cpu_threads,
            gpu_memory_fraction=args.gpu_memory_fraction, ops=args.ops,
            tp_size=args.tp_size, tp_lora_scheme=args.tp_lora_scheme,
            tp_cuda_graphs=settings.read("TP_CUDA_GRAPHS"),
            packed_adapter_bytes=settings.read("ENGINE_PACKED_ADAPTER_BYTES"),
            adapter_pack_threads=settings.read("ENGINE_ADAPTER_PACK_THREADS"),
            random_weights_seed=None if (seed := settings.read("RANDOM_WEIGHTS_SEED")) < 0 else seed,
        )
        return cls(
            kafka_bootstrap=args.kafka_bootstrap, redis_url=args.redis_url, store_address=args.store_address,
            engine=engine, work_topic=args.work_topic, work_partitions=args.work_partitions,
            group_id=args.group_id, engine_id=args.engine_id, drain_timeout_s=args.drain_timeout_s,
            session_timeout_ms=settings.read("KAFKA_SESSION_TIMEOUT_MS"),
            step_stall_s=settings.read("ENGINE_STEP_STALL_S"), max_queue_s=settings.read("ENGINE_MAX_QUEUE_S"),
        )

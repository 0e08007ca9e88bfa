"""Configuration of the engine service (`lorafleet engine`): flags with LORAFLEET_* defaults."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from lorafleet.common import settings
from lorafleet.engine.config import EngineConfig  # no torch: probes parse these flags without it


@dataclass(frozen=True)
class EngineServiceConfig:
    kafka_bootstrap: str = settings.config_field("KAFKA_BOOTSTRAP", required=True)
    redis_url: str = settings.config_field("REDIS_URL", required=True)
    store_address: str = settings.config_field("STORE_ADDRESS", required=True)
    engine: EngineConfig  # its own knobs: engine/config.py
    work_topic: str = settings.config_field("WORK_TOPIC")
    work_partitions: int = settings.config_field("WORK_PARTITIONS")
    group_id: str = settings.config_field("ENGINE_GROUP", flag="--group-id")
    engine_id: str = settings.config_field("ENGINE_ID")
    drain_timeout_s: float = settings.config_field("DRAIN_TIMEOUT_S")
    # messages held (queued + running) before the consumer pauses
    max_inflight: int = settings.config_field("ENGINE_MAX_INFLIGHT")
    # give up on an adapter the store cannot serve after this
    adapter_unavailable_s: float = settings.config_field("ENGINE_ADAPTER_UNAVAILABLE_S")
    session_timeout_ms: int = settings.config_field("KAFKA_SESSION_TIMEOUT_MS")
    # A step running longer than this is a hang (a GPU fault, a TP collective or decode graph
    # waiting for a dead rank): the liveness heartbeat is withheld so Kubernetes restarts the pod.
    # Above the TP collective timeout (180 s), so a failure that raises does so first.
    step_stall_s: float = settings.config_field("ENGINE_STEP_STALL_S")
    # Load shedding: a request with no token yet this long after ingest took it ends `overloaded`.
    max_queue_s: float = settings.config_field("ENGINE_MAX_QUEUE_S")

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
        settings.add_flag(parser, "--model", "MODEL", str, "Hugging Face model folder")
        settings.add_config_flags(parser, EngineServiceConfig)  # the service's knobs, from its fields
        settings.add_config_flags(parser, EngineConfig)  # every engine knob, from its fields

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_dir: Path | str | None = None) -> "EngineServiceConfig":
        model = model_dir if model_dir is not None else args.model
        if not model:
            raise ValueError("the engine needs a model folder: pass --model or set LORAFLEET_MODEL")
        engine = EngineConfig(model_dir=str(model), **settings.config_values(EngineConfig, args))
        return cls(engine=engine, **settings.config_values(cls, args))

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
        settings.add_flag(parser, "--drain-timeout-s", "DRAIN_TIMEOUT_S", float, "drain limit on SIGTERM")
        settings.add_config_flags(parser, EngineConfig)  # every engine knob, from its field

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_dir: Path | str | None = None) -> "EngineServiceConfig":
        model = model_dir if model_dir is not None else args.model
        if not model:
            raise ValueError("the engine needs a model folder: pass --model or set LORAFLEET_MODEL")
        engine = EngineConfig(model_dir=str(model), **settings.config_values(EngineConfig, args))
        return cls(
            kafka_bootstrap=args.kafka_bootstrap, redis_url=args.redis_url, store_address=args.store_address,
            engine=engine, work_topic=args.work_topic, work_partitions=args.work_partitions,
            group_id=args.group_id, engine_id=args.engine_id, drain_timeout_s=args.drain_timeout_s,
            session_timeout_ms=settings.read("KAFKA_SESSION_TIMEOUT_MS"),
            step_stall_s=settings.read("ENGINE_STEP_STALL_S"), max_queue_s=settings.read("ENGINE_MAX_QUEUE_S"),
        )

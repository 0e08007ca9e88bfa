"""Ingest configuration: one frozen dataclass, built from CLI flags whose defaults come from the
LORAFLEET_ environment variables (services/common/settings.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lorafleet.common import settings
from lorafleet.ingest.routing import ROUTING_POLICIES


@dataclass(frozen=True)
class IngestConfig:
    kafka_bootstrap: str = settings.config_field("KAFKA_BOOTSTRAP", required=True)
    redis_url: str = settings.config_field("REDIS_URL", required=True)
    model_dir: Path  # tokenizer files + config.json (vocab_size, max_position_embeddings); --model
    requests_topic: str = settings.config_field("REQUESTS_TOPIC")
    dlq_topic: str = settings.config_field("DLQ_TOPIC")
    work_topic: str = settings.config_field("WORK_TOPIC")
    requests_partitions: int = settings.config_field("REQUESTS_PARTITIONS")
    work_partitions: int = settings.config_field("WORK_PARTITIONS")
    group_id: str = settings.config_field("INGEST_GROUP", flag="--group-id")
    drain_timeout_s: float = settings.config_field("DRAIN_TIMEOUT_S")
    max_batch: int = settings.config_field("INGEST_MAX_BATCH")
    hot_adapter_rps: float = settings.config_field("HOT_ADAPTER_RPS")
    hot_window_s: float = settings.config_field("HOT_WINDOW_S")
    routing: str = settings.config_field("INGEST_ROUTING")
    session_timeout_ms: int = settings.config_field("KAFKA_SESSION_TIMEOUT_MS")
    chat_template: str = settings.config_field("CHAT_TEMPLATE")

    def __post_init__(self) -> None:
        for name in ("requests_partitions", "work_partitions", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"IngestConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.drain_timeout_s <= 0 or self.hot_adapter_rps <= 0 or self.hot_window_s <= 0:
            raise ValueError("IngestConfig drain_timeout_s, hot_adapter_rps and hot_window_s must be > 0")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"IngestConfig.routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}")
        if len({self.requests_topic, self.dlq_topic, self.work_topic}) != 3:
            raise ValueError("requests, dead-letter and work topics must be three different topics")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of ``lorafleet ingest`` (defaults from the environment)."""


        settings.add_flag(parser, "--model", "MODEL", str, "model folder: tokenizer and config.json")
        settings.add_config_flags(parser, IngestConfig)  # the other knobs, from their fields

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_dir: Path | str | None = None) -> "IngestConfig":
        """`model_dir` overrides --model (``lorafleet up`` passes the demo model it built)."""
        model = model_dir if model_dir is not None else args.model
        if not model:
            raise ValueError("ingest needs a model folder for its tokenizer: pass --model or set LORAFLEET_MODEL")
        return cls(model_dir=Path(model), **settings.config_values(cls, args))

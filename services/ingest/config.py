"""Ingest configuration: one frozen dataclass, built from CLI flags whose defaults come from the
LORAFLEET_ environment variables (services/common/settings.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lorafleet.common import settings


@dataclass(frozen=True)
class IngestConfig:
    kafka_bootstrap: str
    redis_url: str
    model_dir: Path  # tokenizer files + config.json (vocab_size, max_position_embeddings)
    requests_topic: str = "lorafleet.requests"
    dlq_topic: str = "lorafleet.requests.dlq"
    work_topic: str = "lorafleet.work"
    requests_partitions: int = 4
    work_partitions: int = 8
    group_id: str = "lorafleet-ingest"
    drain_timeout_s: float = 30.0
    max_batch: int = 500
    hot_adapter_rps: float = 20.0
    hot_window_s: float = 10.0
    session_timeout_ms: int = 10000

    def __post_init__(self) -> None:
        for name in ("requests_partitions", "work_partitions", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"IngestConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.drain_timeout_s <= 0 or self.hot_adapter_rps <= 0 or self.hot_window_s <= 0:
            raise ValueError("IngestConfig drain_timeout_s, hot_adapter_rps and hot_window_s must be > 0")
        if len({self.requests_topic, self.dlq_topic, self.work_topic}) != 3:
            raise ValueError("requests, dead-letter and work topics must be three different topics")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of ``lorafleet ingest`` (defaults from the environment)."""


        settings.add_flag(parser, "--kafka-bootstrap", "KAFKA_BOOTSTRAP", str, "Kafka bootstrap servers")
        settings.add_flag(parser, "--redis-url", "REDIS_URL", str, "Redis URL of the reply streams")
        settings.add_flag(parser, "--model", "MODEL", str, "model folder: tokenizer and config.json")
        settings.add_flag(parser, "--requests-topic", "REQUESTS_TOPIC", str, "topic of user requests")
        settings.add_flag(parser, "--dlq-topic", "DLQ_TOPIC", str, "dead-letter topic")
        settings.add_flag(parser, "--work-topic", "WORK_TOPIC", str, "engines' work topic")
        settings.add_flag(parser, "--work-partitions", "WORK_PARTITIONS", int, "work topic partitions, when created")
        settings.add_flag(parser, "--requests-partitions", "REQUESTS_PARTITIONS", int, "requests topic partitions, when created")
        settings.add_flag(parser, "--group-id", "INGEST_GROUP", str, "consumer group of ingest")
        settings.add_flag(parser, "--drain-timeout-s", "DRAIN_TIMEOUT_S", float, "drain limit on SIGTERM")

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_dir: Path | str | None = None) -> "IngestConfig":
        """`model_dir` overrides --model (``lorafleet up`` passes the demo model it built)."""
        model = model_dir if model_dir is not None else args.model
        if not model:
            raise ValueError("ingest needs a model folder for its tokenizer: pass --model or set LORAFLEET_MODEL")
        return cls(
            kafka_bootstrap=args.kafka_bootstrap,
            redis_url=args.redis_url,
            model_dir=Path(model),
            requests_topic=args.requests_topic,
            dlq_topic=args.dlq_topic,
            work_topic=args.work_topic,
            requests_partitions=args.requests_partitions,
            work_partitions=args.work_partitions,
            group_id=args.group_id,
            drain_timeout_s=args.drain_timeout_s,
            max_batch=settings.read("INGEST_MAX_BATCH"),
            hot_adapter_rps=settings.read("HOT_ADAPTER_RPS"),
            hot_window_s=settings.read("HOT_WINDOW_S"),
            session_timeout_ms=settings.read("KAFKA_SESSION_TIMEOUT_MS"),
        )

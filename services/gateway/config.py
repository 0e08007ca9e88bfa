"""Gateway configuration: one frozen dataclass, built from CLI flags whose defaults come from the
LORAFLEET_ environment variables (services/common/settings.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lorafleet.common import settings

DEMO_MODEL_NAME = "demo"


@dataclass(frozen=True)
class GatewayConfig:
    kafka_bootstrap: str = settings.config_field("KAFKA_BOOTSTRAP", required=True)
    redis_url: str = settings.config_field("REDIS_URL", required=True)
    requests_topic: str = settings.config_field("REQUESTS_TOPIC")
    requests_partitions: int = settings.config_field("REQUESTS_PARTITIONS")
    host: str = settings.config_field("GATEWAY_HOST", flag="--host")
    port: int = settings.config_field("GATEWAY_PORT", flag="--port")
    model_name: str = settings.config_field("GATEWAY_MODEL_NAME", flag="--served-model-name")
    # the adapter root GET /v1/models lists; empty: the base model alone is listed
    adapters: str = settings.config_field("ADAPTERS", flag="--adapters")
    api_key: str = settings.config_field("GATEWAY_API_KEY")
    request_timeout_s: float = settings.config_field("GATEWAY_REQUEST_TIMEOUT_S")
    max_choices: int = settings.config_field("GATEWAY_MAX_CHOICES")
    models_cache_s: float = settings.config_field("GATEWAY_MODELS_CACHE_S")
    drain_timeout_s: float = settings.config_field("DRAIN_TIMEOUT_S")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"GatewayConfig.port must be 0-65535, got {self.port}")
        if self.request_timeout_s <= 0 or self.max_choices < 1 or self.models_cache_s < 0:
            raise ValueError("GatewayConfig request_timeout_s must be > 0, max_choices >= 1, models_cache_s >= 0")
        if not self.model_name:
            raise ValueError("the gateway needs the base model's name: pass --served-model-name "
                             "(LORAFLEET_GATEWAY_MODEL_NAME) or --model")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of ``lorafleet gateway`` (defaults from the environment)."""
        settings.add_flag(parser, "--model", "MODEL", str, "the base model folder (its name is the base `model` "
                          "unless --served-model-name is given; nothing is read from it)")
        settings.add_config_flags(parser, GatewayConfig)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GatewayConfig":
        values = settings.config_values(cls, args)
        values["model_name"] = values["model_name"] or served_model_name(args.model)
        return cls(**values)


def served_model_name(model: str) -> str:
    """The base model's `model` name when none is given: its folder's name, `demo` for the demo."""
    return Path(model).name if model else DEMO_MODEL_NAME

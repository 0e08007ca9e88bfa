"""Configuration of the node's adapter-store process: one frozen dataclass, from env and CLI flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lorafleet.common import settings
from lorafleet.common.adapter_root import S3Options

from .retry import RetryPolicy


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:port') -> (host, port), with errors naming the address."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"store address {address!r} must be host:port with a port in [0, 65535]")
    return host.strip("[]"), int(port_text)


@dataclass(frozen=True)
class AdapterStoreConfig:
    model_dir: Path  # the base model: adapters are validated against its shapes
    adapters_root: str  # file:///abs, a plain path, or s3://bucket/prefix
    # where the store listens; port 0: any free port
    address: str = settings.config_field("STORE_ADDRESS", flag="--address")
    shm_dir: Path = settings.config_field("STORE_SHM_DIR", flag="--shm-dir")  # a Path after __post_init__
    memory_bytes: int = settings.config_field("STORE_MEMORY_BYTES")
    max_adapter_bytes: int = settings.config_field("STORE_MAX_ADAPTER_BYTES")
    negative_ttl_s: float = settings.config_field("STORE_NEGATIVE_TTL_S")
    max_rank: int = settings.config_field("MAX_ADAPTER_RANK")
    # local disk for adapters evicted from memory; "" or None: no spill (None after __post_init__)
    spill_dir: Path | None = settings.config_field("STORE_SPILL_DIR")
    spill_bytes: int = settings.config_field("STORE_SPILL_BYTES")
    fetch_attempts: int = settings.config_field("STORE_FETCH_ATTEMPTS")
    s3_endpoint: str = settings.config_field("S3_ENDPOINT")
    s3_allow_http: bool = settings.config_field("S3_ALLOW_HTTP")
    request_timeout_s: float = settings.config_field("STORE_REQUEST_TIMEOUT_S")

    @property
    def s3(self) -> S3Options:
        return S3Options(endpoint=self.s3_endpoint, allow_http=self.s3_allow_http,
                         request_timeout_s=self.request_timeout_s)

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.fetch_attempts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shm_dir", Path(self.shm_dir))
        object.__setattr__(self, "spill_dir", Path(self.spill_dir) if self.spill_dir else None)
        parse_address(self.address)
        if not str(self.adapters_root):
            raise ValueError("adapters_root is empty: pass --adapters or set LORAFLEET_ADAPTERS")
        if self.max_adapter_bytes < 1:
            raise ValueError(f"LORAFLEET_STORE_MAX_ADAPTER_BYTES must be >= 1, got {self.max_adapter_bytes}")
        if self.memory_bytes < self.max_adapter_bytes:
            raise ValueError(
                f"LORAFLEET_STORE_MEMORY_BYTES ({self.memory_bytes}) must be >= "
                f"LORAFLEET_STORE_MAX_ADAPTER_BYTES ({self.max_adapter_bytes}): the largest adapter must fit"
            )
        if self.negative_ttl_s < 0:
            raise ValueError(f"LORAFLEET_STORE_NEGATIVE_TTL_S must be >= 0, got {self.negative_ttl_s}")
        if self.max_rank < 1:
            raise ValueError(f"LORAFLEET_MAX_ADAPTER_RANK must be >= 1, got {self.max_rank}")

    @classmethod
    def from_env_and_args(cls, *, model_dir: str | Path | None = None, adapters_root: str | None = None,
                          environ: Mapping[str, str] | None = None, **given: Any) -> "AdapterStoreConfig":
        """Values given (CLI flags, by field name: address=..., memory_bytes=...) win; the rest come
        from LORAFLEET_* variables (`environ`, default os.environ) or their declared defaults.

        The CLI resolves the demo model and adapters when LORAFLEET_MODEL / LORAFLEET_ADAPTERS are
        empty; here an empty value is an error naming the variable.
        """
        env = dict(environ) if environ is not None else None
        model = model_dir if model_dir is not None else settings.read("MODEL", env)
        if not str(model):
            raise ValueError("no base model: pass --model or set LORAFLEET_MODEL")
        knobs = settings.config_env_values(cls, env)
        unknown = set(given) - set(knobs)
        if unknown:
            raise TypeError(f"AdapterStoreConfig has no knob {', '.join(sorted(unknown))}")
        knobs.update({name: value for name, value in given.items() if value is not None})
        root = adapters_root if adapters_root is not None else settings.read("ADAPTERS", env)
        return cls(model_dir=Path(model), adapters_root=root, **knobs)

"""Configuration of the node's adapter-store process: one frozen dataclass, from env and CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from lorafleet.common import settings

from .retry import RetryPolicy
from .source import S3Options


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
    address: str = "127.0.0.1:7070"  # where the store listens; port 0: any free port
    shm_dir: Path = Path("/dev/shm/lorafleet-adapters")
    memory_bytes: int = 8 << 30
    max_adapter_bytes: int = 2 << 30
    negative_ttl_s: float = 10.0
    max_rank: int = 256
    spill_dir: Path | None = None  # local disk for adapters evicted from memory (None: no spill)
    spill_bytes: int = 64 << 30
    s3: S3Options = field(default_factory=S3Options)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
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
    def from_env_and_args(
        cls,
        *,
        model_dir: str | Path | None = None,
        adapters_root: str | None = None,
        address: str | None = None,
        shm_dir: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> "AdapterStoreConfig":
        """Arguments given (CLI flags) win; the rest comes from LORAFLEET_* variables or their defaults.

        The CLI resolves the demo model and adapters when LORAFLEET_MODEL / LORAFLEET_ADAPTERS are
        empty; here an empty value is an error naming the variable.
        """
        env = dict(environ) if environ is not None else None

        def read(name: str):
            return settings.read(name, env)

        model = model_dir if model_dir is not None else read("MODEL")
        if not str(model):
            raise ValueError("no base model: pass --model or set LORAFLEET_MODEL")
        return cls(
            model_dir=Path(model),
            adapters_root=adapters_root if adapters_root is not None else read("ADAPTERS"),
            address=address if address is not None else read("STORE_ADDRESS"),
            shm_dir=Path(shm_dir if shm_dir is not None else read("STORE_SHM_DIR")),
            memory_bytes=read("STORE_MEMORY_BYTES"),
            max_adapter_bytes=read("STORE_MAX_ADAPTER_BYTES"),
            negative_ttl_s=read("STORE_NEGATIVE_TTL_S"),
            max_rank=read("MAX_ADAPTER_RANK"),
            spill_dir=Path(read("STORE_SPILL_DIR")) if read("STORE_SPILL_DIR") else None,
            spill_bytes=read("STORE_SPILL_BYTES"),
            s3=S3Options(
                endpoint=read("S3_ENDPOINT"),
                allow_http=read("S3_ALLOW_HTTP"),
                request_timeout_s=read("STORE_REQUEST_TIMEOUT_S"),
            ),
            retry=RetryPolicy(attempts=read("STORE_FETCH_ATTEMPTS")),
        )

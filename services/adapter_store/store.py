"""The in-process adapter store: storage -> validation -> LoraWeights in host memory.

Usable on its own (tests, a single-process deployment); the node's store process
(server.py + shm.py) runs the same fetch, validation and cache, keeping files instead of tensors.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import structlog

from lorafleet.common.ids import validate_adapter_id
from lorafleet.formats.lora_weights import LoraWeights, load_peft_adapter
from lorafleet.formats.model_spec import ModelSpec

from .cache import LoadingLRU
from .retry import RetryPolicy
from .source import AdapterSource, S3Options


async def fetch_validated(source: AdapterSource, adapter_id: str, spec: ModelSpec, max_rank: int) -> LoraWeights:
    """Read the adapter's files and validate them against the base model (off the event loop)."""
    fetched = await source.fetch(adapter_id)
    started = time.monotonic()
    weights = await asyncio.to_thread(load_peft_adapter, fetched.config_bytes, fetched.weights_bytes, spec, max_rank)
    structlog.get_logger().bind(adapter_id=adapter_id).info(
        "adapter validated",
        rank=weights.config.rank,
        modules=len(weights.config.targets),
        nbytes=weights.nbytes,
        validate_s=round(time.monotonic() - started, 4),
    )
    return weights


class AdapterStore:
    """`await store.get(id)` -> validated LoraWeights, fetched once however many callers ask.

    Raises ValueError (malformed id), AdapterNotFoundError, InvalidAdapterError (both remembered
    for `negative_ttl_s`) or AdapterStoreUnavailable (transient, after the source's retries).
    """

    def __init__(
        self,
        source: AdapterSource,
        spec: ModelSpec,
        *,
        memory_bytes: int,
        negative_ttl_s: float,
        max_rank: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.spec = spec
        self.max_rank = max_rank
        self.cache: LoadingLRU[LoraWeights] = LoadingLRU(
            self._load, budget_bytes=memory_bytes, negative_ttl_s=negative_ttl_s, clock=clock
        )

    @classmethod
    def from_root(
        cls,
        root: str,
        spec: ModelSpec,
        *,
        memory_bytes: int,
        max_adapter_bytes: int,
        negative_ttl_s: float,
        max_rank: int = 256,
        s3: S3Options = S3Options(),
        retry: RetryPolicy = RetryPolicy(),
    ) -> "AdapterStore":
        source = AdapterSource(root, max_adapter_bytes=max_adapter_bytes, s3=s3, retry=retry)
        return cls(source, spec, memory_bytes=memory_bytes, negative_ttl_s=negative_ttl_s, max_rank=max_rank)

    async def get(self, adapter_id: str) -> LoraWeights:
        validate_adapter_id(adapter_id)
        return await self.cache.get(adapter_id)

    def prefetch(self, adapter_id: str) -> None:
        """Start fetching in the background (fire and forget); a malformed id raises ValueError."""
        validate_adapter_id(adapter_id)
        self.cache.prefetch(adapter_id)

    async def _load(self, adapter_id: str) -> tuple[LoraWeights, int]:
        weights = await fetch_validated(self.source, adapter_id, self.spec, self.max_rank)
        return weights, weights.nbytes
